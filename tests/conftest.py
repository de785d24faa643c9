"""Test configuration: isolated MSM_HOME, no API keys, helpers to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
OPENAI_SPEC = SHARED / "realworld" / "openai_model_spec.md"

# Tests never spend money: no key reaches any code under test, whatever the shell has set.
for _key in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
    os.environ.pop(_key, None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test writes under its own MSM_HOME and warehouse."""
    home = tmp_path / "msm_home"
    monkeypatch.setenv("MSM_HOME", str(home))
    monkeypatch.delenv("MSM_DB", raising=False)
    monkeypatch.setenv("MSM_DB_LOCK_WAIT", "0.3")
    monkeypatch.chdir(tmp_path)
    return home


def run_msm(*args: str, input: str | None = None, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 120):
    """Run the installed CLI in a real subprocess (stdout, stderr and exit code as a user sees them)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "msm.cli", *args],
        capture_output=True, text=True, input=input, env=full_env, cwd=cwd, timeout=timeout,
    )


def assert_one_line_error(result, *needles: str):
    """Bad input: non-zero exit, exactly one line on stderr, no traceback, naming the problem."""
    assert result.returncode != 0, result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_partition(spec, body_lines: int | None = None):
    """The units' spans cover every body line exactly once, in order, and text is lossless."""
    spans = [u.span for u in spec.units]
    assert spans, "no units"
    assert spans[0][0] == spec.body_start
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a0 <= a1, (a0, a1)
        assert b0 == a1 + 1, (a1, b0)
    assert spans[-1][1] == spec.n_lines
    assert "\n".join(u.text for u in spec.units) == spec.text
    ids = [u.id for u in spec.units]
    assert len(ids) == len(set(ids)), "duplicate unit ids"
    seen = set()
    for unit in spec.units:
        if unit.parent is not None:
            assert unit.parent in seen, f"{unit.id}: parent {unit.parent} does not precede it"
        seen.add(unit.id)


os.environ["MSM_NO_SPEND"] = "1"  # non-local backends only ever reach a loopback server in tests

LOOPBACK_KEY = "sk-loopback-test-key"


@pytest.fixture
def loopback():
    """A real HTTP server on 127.0.0.1 speaking the Anthropic and OpenAI APIs."""
    from msm.llm.testing import LoopbackServer

    with LoopbackServer(api_key=LOOPBACK_KEY, min_cache_tokens=256) as server:
        yield server
