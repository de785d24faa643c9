"""Where msm reads and writes: msm.toml, then the environment, then flags (later sources win)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from msm.errors import MsmError

CONFIG_FILE = "msm.toml"


@dataclass(frozen=True)
class Settings:
    home: Path
    db: Path
    config_file: Path | None


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise MsmError(f"{path} is not valid TOML ({exc})", "fix the file or remove it") from None


def read_config(cwd: Path | None = None) -> dict:
    """msm.toml in the working directory, or {} when there is none."""
    path = (cwd or Path.cwd()) / CONFIG_FILE
    return _read_toml(path) if path.is_file() else {}


def load_settings(db: str | os.PathLike | None = None, cwd: Path | None = None) -> Settings:
    cwd = cwd or Path.cwd()
    config_path = cwd / CONFIG_FILE
    file_cfg = _read_toml(config_path) if config_path.is_file() else {}
    home = Path(os.environ.get("MSM_HOME") or file_cfg.get("home") or ".msm")
    if not home.is_absolute():
        home = cwd / home
    db_path = db or os.environ.get("MSM_DB") or file_cfg.get("db") or home / "msm.duckdb"
    db_path = Path(db_path)
    if not db_path.is_absolute():
        db_path = cwd / db_path
    return Settings(home=home, db=db_path, config_file=config_path if file_cfg else None)


def cache_dir() -> Path:
    """msm's model cache: $XDG_CACHE_HOME/msm, else ~/.cache/msm."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "msm"


def read_yaml(path, what: str, where_to_look: str, error=None):
    """A YAML config file's contents, or a one-line error: missing file, or bad YAML with its line."""
    import yaml

    from msm.errors import MsmError

    error = error or MsmError
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}", f"pass a YAML file (see {where_to_look})")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
    except _DuplicateKey as exc:
        raise error(f"{path}: key '{exc.key}' is given twice (lines {exc.first} and {exc.line})",
                    "keep one of them: YAML would silently use the last") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(f"{path} is not valid YAML{f' at line {mark.line + 1}' if mark else ''}", "fix the file") from None


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, line: int):
        super().__init__(key)
        self.key, self.first, self.line = key, first, line


def _unique_key_loader():
    """yaml.SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports an unhashable key
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
