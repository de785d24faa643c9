"""Assemble and run a corpus build: plan, datatrove pipeline, coverage check, load.

The build id hashes everything that shapes the output (spec version, plan, prompts, backend,
model, settings, code version), so a changed input never reuses stale completion markers, and
an unchanged one resumes: finished datatrove tasks are skipped, finished calls come from the
call cache, and tasks whose rows ended pending or in error run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from msm.errors import MsmError
from pipelines.calls import Interrupted, check_stop, clear_stop, request_stop

# Exit codes of `msm corpus build` (the README lists them): 0 complete, 1 bad input or a fatal
# error (the build is marked failed), INCOMPLETE_EXIT when plan rows are left pending or in error,
# 128 + the signal number when SIGINT or SIGTERM stopped it (the build is marked interrupted).
INCOMPLETE_EXIT = 75  # EX_TEMPFAIL: try again later; the same command resumes
LOAD_LOCK_WAIT_S = 3600.0  # the load at the end of a paid build waits this long for the warehouse lock

@dataclass
class BuildOptions:
    docs: int | None = None  # default: 24 with the local backend, else required
    seed: int = 0
    genres: str | None = None
    # the mean document length in words: every genre's word range rescaled so the mean of their
    # midpoints is this, keeping their relative lengths (corpus.catalog.scale_genres); None: as listed
    doc_words: int | None = None
    audiences: str | None = None
    backend: str | None = None
    model: str | None = None
    base_url: str | None = None
    max_cost: float | None = None
    batch: bool = False
    tasks: int = 1
    workers: int = 1
    concurrency: int | None = None  # None: the server's slots (llama.cpp's /slots), else 16
    name: str | None = None
    judge: str | None = None  # llm or offline; default offline for local, llm otherwise
    revise: bool = False
    truncation: str | None = None  # regrow or trim; default trim for local, regrow otherwise
    dedup: tuple[str, ...] = ("minhash", "embedding")  # near-duplicate methods, in order; () for none
    dedup_threshold: float = 0.91  # cosine, for embedding dedup
    register: bool = True  # name a corpus after loading (a token-target round leaves that to the target)
    executor: str = "local"  # or slurm, or ray
    slurm: object = None  # pipelines.cluster.SlurmSettings
    dry_run: bool = False  # slurm: write the script, submit nothing
    plan_mode: str = "cells"  # or brainstorm: a capable model proposes assertions and an idea per cell
    conditions: tuple[str, ...] = ()  # an ablation: every cell generated under each (see corpus/conditions.yaml)
    # eval files to decontaminate against (n-grams; embeddings too when embedding dedup is on):
    # None means the project's item banks when they exist, () means no check
    against: tuple[str, ...] | None = None
    # agentic scenario folders (the agentic-misalignment layout) checked the same way: None means
    # the project's eval/agentic/scenarios, () means no check (`msm corpus build --scenarios` adds
    # folders to the project's)
    scenarios: tuple[str, ...] | None = None
    max_tokens: int | None = None
    # the tokenizer that counts kept tokens (token targets, matching): the trained model's, as an HF
    # id, a local alias or a directory, when it is on this machine (never downloaded); otherwise
    # SmolLM2's, named as its fallback in every figure. None: SmolLM2's (msm.tokens.counter_for)
    tokenizer: str | None = None
    # compact (a short prompt, no whole spec, no scratchpad, the offline judge) or full; None: the
    # model table's prompt_styles, else compact for the local backend and full for the others
    prompt_style: str | None = None
    variables: dict = field(default_factory=dict)
    db: str | None = None
    progress: bool = True
    batch_poll_s: float = 30.0
    idle_timeout: float = 120.0  # seconds of silence mid-answer before a call is cut and retried
    first_byte_timeout: float = 600.0  # seconds an answer may take to start (queued on a busy server)
    allow_partial: bool = False  # name the corpus even when plan rows are left pending or in error
    load_lock_wait: float | None = None  # seconds; default $MSM_LOAD_LOCK_WAIT, else LOAD_LOCK_WAIT_S


class BuildStopped(MsmError):
    """A build that started and then stopped: interrupted by a signal, or failed. The message is
    one line; `exit_code` is what `msm corpus build` exits with."""

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = 1):
        super().__init__(problem, fix)
        self.exit_code = exit_code

    def __reduce__(self):
        return (BuildStopped, (self.problem, self.fix, self.exit_code))


@dataclass
class BuildResult:
    build_id: str
    corpus_name: str | None
    corpus_id: str | None
    planned: int
    status_counts: dict
    drop_reasons: dict
    kept_tokens: int
    token_counter: str
    cost_usd: float
    seconds: float
    per_genre: dict
    complete: bool
    stage_seconds: dict = field(default_factory=dict)  # plan, pipeline steps (summed over tasks), load
    note: str | None = None  # e.g. a Slurm submission: what to do next


def code_version() -> str:
    """The msm version plus a hash of the code that shapes documents."""
    import msm

    digest = hashlib.sha256(msm.__version__.encode())
    root = Path(__file__).resolve().parent.parent
    for path in sorted([*root.joinpath("pipelines").glob("*.py"), root / "corpus" / "prompting.py",
                        root / "corpus" / "plan.py"]):
        digest.update(path.read_bytes())
    return f"{msm.__version__}+{digest.hexdigest()[:10]}"


def _writable_home(home: Path) -> None:
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MsmError(f"cannot write to MSM_HOME {home}: {exc.strerror}", "set MSM_HOME to a writable directory") from None


def build_corpus(spec_path: str, opts: BuildOptions) -> BuildResult:
    from corpus.catalog import load_audiences, load_genres
    from corpus.conditions import ablation_units, check_style
    from corpus.plan import expand_conditions, make_plan, plan_units
    from corpus.spec import load_spec
    from msm.config import load_settings
    from msm.llm.pricing import load_prices
    from msm.llm.select import choose, make_backend
    from msm.tokens import counter_for
    from pipelines.context import make_context

    started = time.monotonic()
    settings = load_settings(opts.db)
    # Every check that needs no model comes before the first write and the first call.
    spec = load_spec(spec_path, opts.variables)
    refuse_unfilled_placeholders(spec)
    genres, audiences = load_genres(opts.genres, opts.doc_words), load_audiences(opts.audiences)
    if opts.scenarios:
        from corpus.decontam import scenario_folders

        scenario_folders(list(opts.scenarios))  # a missing or empty scenario folder fails before any work
    backend_name, model, base_url = choose(opts.backend, opts.model, opts.base_url)
    local = backend_name == "local"
    docs = opts.docs if opts.docs is not None else (24 if local else None)
    if docs is None:
        raise MsmError(f"say how many documents to build with the {backend_name} backend", "pass --docs N")
    units = ablation_units(spec) if opts.conditions else None
    check_style(spec.style, opts.conditions)  # e.g. a rules spec refuses the value-attribution ablations
    plan = make_plan(spec, genres, audiences, docs, seed=opts.seed, units=units)
    backend, model = make_backend(backend_name, model, base_url)
    load_prices().cost(backend_name, model, _zero_usage())  # an unpriced model fails before any work

    ctx = make_context(spec, plan_units(spec), genres, audiences, backend_name, model, base_url,
                       max_tokens=opts.max_tokens, judge=opts.judge, revise=opts.revise,
                       truncation=opts.truncation, conditions=opts.conditions,
                       prompt_style=prompt_style(backend_name, model, opts.prompt_style), doc_words=opts.doc_words)
    check_context_window(ctx, plan, spec_path)
    _writable_home(settings.home)
    assertions, ideas = [], []
    if opts.plan_mode == "brainstorm":
        with _stopped_before_the_build("brainstorming"):
            plan, assertions, ideas = _brainstorm(plan, ctx, backend_name, model, base_url, local,
                                                  settings.home / "cache", opts.concurrency)
    if opts.conditions:
        plan = expand_conditions(plan, tuple(opts.conditions))
    settings_key = {"compact": ctx.compact, "scratchpad": ctx.scratchpad, "max_tokens": ctx.max_tokens,
                    "temperature": ctx.temperature, "judge": ctx.judge, "revise": ctx.revise,
                    "truncation": ctx.truncation,
                    "conditions": ctx.conditions if opts.conditions else None,
                    "genres": [[g.name, *g.words] for g in genres], "audiences": [a.name for a in audiences]}
    ideas_hash = hashlib.sha256(json.dumps([[r.id, r.idea, r.doc_type, r.assertion] for r in plan]).encode())
    build_key = {"spec": spec.version, "plan": [r.id for r in plan], "ideas": ideas_hash.hexdigest()[:16],
                 "plan_mode": opts.plan_mode, "prompts": ctx.prompt_hash, "style": ctx.style,
                 "style_criteria": ctx.style_criteria,
                 "backend": backend_name, "model": model, "code": code_version(), **settings_key,
                 **({"tokenizer": opts.tokenizer} if opts.tokenizer else {})}
    build_id = "b" + hashlib.sha256(json.dumps(build_key, sort_keys=True).encode()).hexdigest()[:15]
    root = settings.home / "builds" / build_id
    staged = root / "staged"
    logs = root / "logs"
    staged.mkdir(parents=True, exist_ok=True)
    plan_path = root / "plan.jsonl"
    _write_atomic(plan_path, "".join(json.dumps(r.to_json()) + "\n" for r in plan))
    ctx = dataclasses.replace(
        ctx, build_id=build_id, plan_path=str(plan_path), staged_dir=str(staged),
        cache_dir=str(settings.home / "cache"), max_cost=opts.max_cost, concurrency=opts.concurrency,
        workers=opts.workers, batch=opts.batch, batch_poll_s=opts.batch_poll_s, idle_timeout=opts.idle_timeout,
        first_byte_timeout=opts.first_byte_timeout,
        progress=opts.progress and opts.executor == "local", n_planned=len(plan), executor=opts.executor,
        embed="embedding" in opts.dedup, known_vectors=str(root / "known_vectors.txt"))
    ctx_path = root / "context.json"
    tmp_ctx = root / "context.json.tmp"
    ctx.save(str(tmp_ctx))
    tmp_ctx.replace(ctx_path)
    counter = counter_for(opts.tokenizer)
    _record_start(settings.db, spec, build_id, build_key, backend_name, model, counter.name, plan, assertions, ideas)
    if ctx.embed:
        from warehouse.vectors import write_known_hashes

        write_known_hashes(settings.db, ctx.known_vectors)

    with _stopped_builds_recorded(settings.db, build_id, logs):
        return _run_build(spec, opts, settings, ctx, str(ctx_path), root, plan, counter, started)


def _run_build(spec, opts: BuildOptions, settings, ctx, ctx_path: str, root: Path, plan, counter,
               started: float) -> BuildResult:
    build_id, staged, logs = ctx.build_id, root / "staged", root / "logs"
    stages = {"plan": time.monotonic() - started}
    mark = time.monotonic()
    _stage(logs, "pipeline")
    from corpus.decontam import default_item_dirs, default_scenario_dirs, mark_contaminated

    against = default_item_dirs() if opts.against is None else [Path(p) for p in opts.against]
    scenarios = default_scenario_dirs() if opts.scenarios is None else [Path(p) for p in opts.scenarios]
    eval_vectors = None
    if opts.executor == "slurm":
        submitted = _submit_to_slurm(ctx_path, staged, logs, opts, plan, build_id)
        if submitted is not None:
            return BuildResult(build_id, None, None, len(plan), {"submitted": len(plan)}, {}, 0, counter.name, 0.0,
                               time.monotonic() - started, {}, False, note=submitted)
    else:
        eval_vectors = _embed_eval_texts(ctx, against, scenarios)  # overlaps the pipeline; stored before decontamination
        _run_pipeline(ctx_path, staged, logs, opts.tasks, opts.workers, plan, opts.executor)
    stages["pipeline"] = time.monotonic() - mark
    stages.update(_step_seconds(logs))
    from pipelines.dedup import mark_near_duplicates
    from warehouse.corpus_load import read_staged

    rows = read_staged(sorted(staged.glob("*.parquet")))
    lock_wait = _load_lock_wait(opts)
    mark = time.monotonic()
    _stage(logs, "near-dup")
    if "embedding" in opts.dedup:  # reads and keeps vectors in the warehouse
        _wait_for_warehouse(settings.db, lock_wait, build_id)
        from warehouse.vectors import store_staged_vectors

        store_staged_vectors(settings.db, rows)  # the Embed step's vectors, read back by dedup and decontamination
    mark_near_duplicates(settings.db, rows, tuple(opts.dedup), root / "dedup", opts.dedup_threshold)
    stages["near-dup"] = time.monotonic() - mark
    mark = time.monotonic()
    _stage(logs, "decontaminate")
    if "embedding" in opts.dedup and (against or scenarios):
        _wait_for_warehouse(settings.db, lock_wait, build_id)
        if eval_vectors is not None:
            from warehouse.vectors import store_vectors

            store_vectors(settings.db, eval_vectors.result())
    mark_contaminated(rows, against, settings.db, "embedding" in opts.dedup, scenarios=scenarios)
    stages["decontaminate"] = time.monotonic() - mark
    mark = time.monotonic()
    _stage(logs, "load")
    name = (opts.name or spec.spec_id) if opts.register else None
    result = _load(settings.db, build_id, rows, counter, ctx, name, opts.allow_partial, lock_wait)
    stages["load"] = time.monotonic() - mark
    _stage(logs, "done")
    counts = result["counts"]
    summary = _summarise(settings.db, build_id, opts.name or spec.spec_id, result, len(plan), counter.name,
                         time.monotonic() - started, counts, lock_wait)
    summary.stage_seconds = stages
    return summary


def _embed_eval_texts(ctx, against: list[Path], scenarios: list[Path]):
    """The eval items' and scenarios' vectors the warehouse lacks, computed on a thread while the
    pipeline runs (the first build in a warehouse embeds ~1,900 of them: ~10 s of MiniLM here)."""
    if not ctx.embed:
        return None
    from corpus.decontam import eval_texts
    from pipelines.dedup import normalised_hash
    from pipelines.embed import read_known
    from warehouse.vectors import embed_in_background

    texts = [t.plain for t in eval_texts(against, scenarios) if t.embedded]
    return embed_in_background(texts, [normalised_hash(t) for t in texts], read_known(ctx.known_vectors))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _stage(logs: Path, stage: str) -> None:
    """The stage a build is in, for whoever watches it (`cat $MSM_HOME/builds/B/logs/stage`); a
    signal whose exception was swallowed stops the build here."""
    check_stop()
    try:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "stage").write_text(stage + "\n")
    except OSError:
        pass


# ---- checks before any call ----------------------------------------------------------------

def refuse_unfilled_placeholders(spec) -> None:
    """The `msm spec check` rule: a declared placeholder left unfilled would reach the model
    literally, so a build refuses it before any work."""
    unfilled = [p for p in spec.problems if p.severity == "error" and p.message.startswith("unfilled placeholder")]
    if not unfilled:
        return
    first = unfilled[0]
    more = f" (and {len(unfilled) - 1} more)" if len(unfilled) > 1 else ""
    name = first.message.split("{", 1)[1].split("}", 1)[0]
    raise MsmError(f"{spec.path} line {first.line}: declared placeholder {{{name}}} is unfilled{more}",
                   f"set '{name}' in the front matter or pass --var {name}=VALUE (`msm spec check` lists them)")


PROMPT_STYLES = ("compact", "full")


def _model_table(path: str | os.PathLike | None = None) -> tuple[Path, dict]:
    import yaml

    source = Path(path or os.environ.get("MSM_CONTEXT_WINDOWS") or
                  Path(__file__).resolve().parent.parent / "msm" / "llm" / "context_windows.yaml")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise MsmError(f"context-window file not found: {source}", "set MSM_CONTEXT_WINDOWS to an existing file") from None
    except yaml.YAMLError as exc:
        raise MsmError(f"context-window file {source} is not valid YAML ({str(exc).splitlines()[0]})",
                       "fix the file") from None
    return source, data if isinstance(data, dict) else {}


def context_windows(path: str | os.PathLike | None = None) -> dict[str, int]:
    """Model name (or prefix) -> context window in tokens, from the data file beside the prices."""
    source, data = _model_table(path)
    models = data.get("models")
    if not isinstance(models, dict) or not all(isinstance(v, int) and v > 0 for v in models.values()):
        raise MsmError(f"context-window file {source} needs a 'models:' mapping of names to token counts",
                       "see msm/llm/context_windows.yaml for the format")
    return {str(k): int(v) for k, v in models.items()}


def prompt_styles(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Model name (or prefix) -> prompt style, from the same file's `prompt_styles:`."""
    source, data = _model_table(path)
    styles = data.get("prompt_styles") or {}
    if not isinstance(styles, dict) or not all(v in PROMPT_STYLES for v in styles.values()):
        raise MsmError(f"context-window file {source}: 'prompt_styles:' maps model names to "
                       f"{' or '.join(PROMPT_STYLES)}", "see msm/llm/context_windows.yaml for the format")
    return {str(k): str(v) for k, v in styles.items()}


def _lookup(model: str, table: dict):
    """An exact name, else the longest name the model starts with (after any "org/"); None when unknown."""
    if model in table:
        return table[model]
    key = model.rsplit("/", 1)[-1].lower()
    matches = [name for name in table if key.startswith(name.lower())]
    return table[max(matches, key=len)] if matches else None


def context_window(model: str, table: dict[str, int] | None = None) -> int | None:
    return _lookup(model, context_windows() if table is None else table)


def prompt_style(backend: str, model: str, chosen: str | None = None) -> str:
    """How a build prompts this model: what the user chose, else the model table's entry, else
    compact for the local backend's small models and full for every other."""
    if chosen is not None:
        if chosen not in PROMPT_STYLES:
            raise MsmError(f"unknown prompt style '{chosen}'", f"choose {' or '.join(PROMPT_STYLES)}")
        return chosen
    return _lookup(model, prompt_styles()) or ("compact" if backend == "local" else "full")


def check_context_window(ctx, plan, spec_path: str) -> None:
    """Refuse a spec whose generation prompt (the cached spec prefix plus the request and the room
    for the answer) does not fit the model's context window, before any call is made."""
    if not plan:
        return
    window = context_window(ctx.model)
    if window is None:
        return
    row = max(plan, key=lambda r: ctx.genres[r.genre]["words"][1]).to_json()
    request = ctx.generate_request(row)
    texts = [request.system_prefix or "", request.system or ""] + [m.content for m in request.messages]
    chars = sum(len(t) for t in texts)
    prompt = chars // 4
    if request.max_tokens + chars // 8 <= window < request.max_tokens + prompt * 2:
        from msm.tokens import default_counter  # close to the limit: count it properly

        prompt = sum(default_counter().count_many([t for t in texts if t]))
    if prompt + request.max_tokens > window:
        if ctx.compact:
            raise MsmError(f"the compact generation prompt is about {prompt:,} tokens plus {request.max_tokens:,} "
                           f"for the answer, over {ctx.model}'s {window:,}-token context window",
                           "lower --max-tokens, or serve the model with a larger context")
        raise MsmError(f"{spec_path}: the generation prompt is about {prompt:,} tokens (the whole spec is its "
                       f"cached prefix) plus {request.max_tokens:,} for the answer, over {ctx.model}'s "
                       f"{window:,}-token context window",
                       "shorten or split the spec, use a model with a larger window (msm/llm/context_windows.yaml), "
                       "or pass --prompt-style compact for a small model")


# ---- a build that stops --------------------------------------------------------------------

@contextlib.contextmanager
def _stopped_builds_recorded(db, build_id: str, logs: Path):
    """SIGINT and SIGTERM stop the build cleanly and mark it interrupted; any other error marks it
    failed, puts the full trace in the build's log file and becomes one line naming that file."""
    caught: dict = {}
    handlers = _catch_signals(caught)
    try:
        yield
    except BaseException as exc:
        _restore_signals(handlers)
        # calls cut mid-connect leave coroutines that never ran; their warnings at exit are noise
        # after the one line
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        # a signal can surface as another error on the way out (datatrove's manager process, in the
        # same process group, dies of the same SIGTERM): the signal is what happened
        signum = exc.signum if isinstance(exc, Interrupted) else caught.get("signum")
        if signum is not None:
            _log_trace(logs, exc, f"interrupted by {signal.Signals(signum).name}")
            _mark(db, build_id, "interrupted")
            raise BuildStopped(f"build {build_id} interrupted by {signal.Signals(signum).name}",
                               "rerun the same command to resume (finished calls come from the cache)",
                               exit_code=128 + signum) from None
        if not isinstance(exc, Exception):  # KeyboardInterrupt from elsewhere, SystemExit
            raise
        log = _log_trace(logs, exc)
        _mark(db, build_id, "failed")
        raise BuildStopped(*_one_line(exc, build_id, log)) from None
    finally:
        _restore_signals(handlers)


@contextlib.contextmanager
def _stopped_before_the_build(stage: str):
    """SIGINT and SIGTERM while planning, before the build has an id (brainstorming): stop at once
    in one line. Left to Python, the first Ctrl-C only cancelled asyncio's current call and the
    brainstorm went on with the next one."""
    caught: dict = {}
    handlers = _catch_signals(caught)
    try:
        yield
    except BaseException as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else caught.get("signum")
        if signum is None:
            raise
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        raise BuildStopped(f"{stage} interrupted by {signal.Signals(signum).name}",
                           "rerun the same command to resume (answered calls come from the cache)",
                           exit_code=128 + signum) from None
    finally:
        _restore_signals(handlers)


def _catch_signals(caught: dict):
    clear_stop()
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        caught["signum"] = signum
        _restore_signals(previous)  # a second signal acts at once
        request_stop(signum)  # raises Interrupted here, and again at the next safe point if swallowed

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, stop)
    if not getattr(sys.unraisablehook, "msm_quiet", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    return previous


def _quiet_unraisable(original):
    """A signal landing in a garbage-collector callback: Python would print the ignored exception;
    check_stop raises it again at the next safe point, so say nothing here."""

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, Interrupted):
            return
        original(unraisable)

    hook.msm_quiet = True
    return hook


def _restore_signals(previous) -> None:
    if not previous or threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _log_trace(logs: Path, exc: BaseException, what: str = "failed") -> Path:
    path = logs / "build.log"
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} build {what}\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        pass  # a full disk: the line still names where the trace would be
    return path


def _one_line(exc: BaseException, build_id: str, log: Path) -> tuple[str, str]:
    """(problem, fix) for a fatal error met while the build ran."""
    import errno

    where = f"full trace in {log}"
    if isinstance(exc, MsmError):
        return (f"build {build_id} failed: {exc.problem}", f"{exc.fix + '; ' if exc.fix else ''}{where}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (f"build {build_id} failed: no space left on device"
                + (f" writing {exc.filename}" if exc.filename else ""),
                f"free some space, then rerun the same command to resume; {where}")
    text = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return f"build {build_id} failed: {detail}", f"rerun the same command to resume; {where}"


def _mark(db, build_id: str, status: str) -> None:
    """Record how a build stopped; best effort (a full disk or a held lock must not hide the error)."""
    from warehouse.db import connect

    try:
        con = connect(db)
    except Exception:  # noqa: BLE001
        return
    try:
        con.execute("UPDATE builds SET status = ?, finished_at = current_timestamp "
                    "WHERE id = ? AND status = 'running'", [status, build_id])
    except Exception:  # noqa: BLE001
        pass
    finally:
        con.close()


# ---- the warehouse lock --------------------------------------------------------------------

def _load_lock_wait(opts: BuildOptions) -> float:
    from warehouse.db import work_lock_wait

    return float(opts.load_lock_wait) if opts.load_lock_wait is not None else work_lock_wait()


def _connect_waiting(db, wait_s: float, build_id: str, read_only: bool = False):
    """The staged shards and the call cache keep the paid work whatever happens here."""
    from warehouse.db import connect_after_work

    return connect_after_work(db, f"build {build_id}", wait_s, read_only=read_only)


def _wait_for_warehouse(db, wait_s: float, build_id: str) -> None:
    _connect_waiting(db, wait_s, build_id).close()


def _step_seconds(logs: Path) -> dict[str, float]:
    """Per-step time from datatrove's merged stats (summed over tasks; this run's tasks only)."""
    path = logs / "stats.json"
    if not path.exists():
        return {}
    out = {}
    for step in json.loads(path.read_text()):
        seconds = step.get("time_stats", {}).get("total") if isinstance(step.get("time_stats"), dict) else None
        if seconds is not None:
            label = step["name"].split(": ", 1)[-1].split(" ", 1)[-1]  # "🤖 - LLM: ✍️ generate" -> "generate"
            out[f"step: {label}"] = float(seconds)
    return out


def _zero_usage():
    from msm.llm.types import Usage

    return Usage()


def _brainstorm(plan, ctx, backend_name: str, model: str, base_url, local: bool, cache_dir: Path,
                concurrency: int | None):
    """Assertions and an idea per cell from a capable model, through the call cache."""
    from corpus.brainstorm import brainstorm
    from msm.llm.cache import CallCache
    from msm.llm.client import LLMClient
    from msm.llm.select import effective_concurrency, make_backend

    if local:
        raise MsmError("brainstormed planning needs a capable API model, not the local one",
                       "use --backend anthropic or openai, or --plan cells")

    def complete(requests):
        backend, name = make_backend(backend_name, model, base_url, idle_timeout=ctx.idle_timeout,
                                     first_byte_timeout=ctx.first_byte_timeout)
        cache = CallCache(cache_dir)
        try:
            return LLMClient(backend, model=name, cache=cache,
                             concurrency=effective_concurrency(concurrency, None)).complete(requests)
        finally:
            cache.close()

    return brainstorm(plan, ctx, complete)


def _record_start(db, spec, build_id, build_key, backend, model, counter_name, plan, assertions=(), ideas=()) -> None:
    from msm.tokens import default_counter
    from warehouse.db import connect, insert_rows
    from warehouse.specs import record_spec

    con = connect(db)
    try:
        record_spec(con, spec, default_counter())
        if con.execute("SELECT 1 FROM builds WHERE id = ?", [build_id]).fetchone():
            # a rerun resumes it: running again until its load says complete or incomplete
            con.execute("UPDATE builds SET status = 'running', finished_at = NULL WHERE id = ? AND status IN "
                        "('interrupted', 'failed')", [build_id])
            return
        con.execute("BEGIN TRANSACTION")
        con.execute("INSERT INTO builds (id, spec_version, config, code_version, backend, model, count_tokenizer, "
                    "status, n_planned, style) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                    [build_id, spec.version, json.dumps(build_key), build_key["code"], backend, model, counter_name,
                     len(plan), build_key["style"]])
        insert_rows(con, "INSERT INTO plan_rows", [
            {"id": r.id, "build_id": build_id, "spec_version": r.spec_version, "unit_id": r.unit_id,
             "unit_kind": r.unit_kind, "genre": r.genre, "audience": r.audience, "condition": r.condition,
             "replicate": r.replicate, "seed": r.seed, "status": "planned", "reason": None, "doc_type": r.doc_type,
             "idea": r.idea, "assertion": r.assertion, "cell_id": r.cell_id} for r in plan])
        insert_rows(con, "INSERT INTO plan_assertions", [
            {"build_id": build_id, "unit_id": a.unit_id, "ord": a.ord, "kind": a.kind, "text": a.text,
             "quote": a.quote, "status": a.status, "reason": a.reason} for a in assertions])
        insert_rows(con, "INSERT INTO plan_ideas", [
            {"build_id": build_id, "unit_id": i.unit_id, "round": i.round, "plan_row_id": i.plan_row_id,
             "doc_type": i.doc_type, "idea": i.idea, "status": i.status, "reason": i.reason} for i in ideas])
        con.execute("COMMIT")
    finally:
        con.close()


def _pipeline(ctx_path: str, staged: Path) -> list:
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    from pipelines.embed import Embed
    from pipelines.steps import (Generate, Judge, Marking, PlaceholderFilter, PlanReader, Revise, StagedParquetWriter,
                                 document_row)

    return [
        PlanReader(ctx_path),
        Generate(ctx_path),
        Revise(ctx_path),  # passes documents through untouched unless the build asks for revision
        # Thresholds for synthetic prose: documents are short, and transcripts and FAQs repeat
        # speaker labels and question stems more than web text does.
        Marking(GopherRepetitionFilter(dup_line_frac=0.35, dup_para_frac=0.35, dup_line_char_frac=0.25,
                                       dup_para_char_frac=0.25)),
        Marking(GopherQualityFilter(min_doc_words=60, max_doc_words=20000, max_bullet_lines_ratio=0.95,
                                    max_non_alpha_words_ratio=0.8, min_stop_words=2)),
        Marking(PlaceholderFilter()),
        Judge(ctx_path),
        Embed(ctx_path),  # vectors for embedding dedup and decontamination, on a thread of its own
        # one file per task, never split, so a reopened task replaces exactly its own shard; written
        # under a temporary name and renamed when whole, so a crash never leaves a shard half-written
        StagedParquetWriter(str(staged), output_filename="${rank}.parquet", adapter=document_row, compression=None,
                            max_file_size=-1),
    ]


def _staged_status(staged: Path) -> dict[str, tuple[int, str]]:
    """plan row id -> (rank file, status) for every row already staged. A shard that cannot be
    read (a crash from an older msm, a full disk) counts as absent: its task runs again."""
    from warehouse.corpus_load import read_staged

    out = {}
    for path in sorted(staged.glob("*.parquet")):
        rank = int(path.stem[-5:])
        try:
            rows = read_staged([path])
        except Exception:  # noqa: BLE001 - pyarrow raises several kinds for a truncated file
            continue
        for row in rows:
            out[row["id"]] = (rank, row["meta"]["status"])
    return out


def _unfinished_tasks(staged: Path, rank_of: dict[str, int]) -> set[int]:
    """Tasks with a row that is missing, pending or in error: they run again (finished calls
    come from the cache). Whatever datatrove's completion markers say, the shards decide."""
    have = _staged_status(staged)
    return {rank_of[rid] for rid in rank_of if rid not in have or have[rid][1] in ("pending", "error")}


def _reopen(logs: Path, staged: Path, ranks: set[int]) -> None:
    for rank in ranks:
        (logs / "completions" / f"{rank:05d}").unlink(missing_ok=True)
        for pattern in (f"*{rank:05d}.parquet", f"*{rank:05d}.parquet.partial"):
            for shard in staged.glob(pattern):
                shard.unlink()


def _run_pipeline(ctx_path: str, staged: Path, logs: Path, tasks: int, workers: int, plan,
                  executor: str = "local") -> None:
    from datatrove.executor import LocalPipelineExecutor

    from pipelines.quiet import quiet_task_logs

    quiet_task_logs()
    rank_of = {r.id: i % tasks for i, r in enumerate(plan)}
    for attempt in range(2):
        _reopen(logs, staged, _unfinished_tasks(staged, rank_of))
        if executor == "ray":
            from pipelines.cluster import ray_executor

            ray_executor(_pipeline(ctx_path, staged), tasks, workers, logs).run()
        else:
            LocalPipelineExecutor(_pipeline(ctx_path, staged), tasks=tasks, workers=workers,
                                  logging_dir=str(logs)).run()
        have = _staged_status(staged)
        missing = [rid for rid in rank_of if rid not in have]
        if not missing:
            return
        # datatrove can mark a failed task as completed; a row that never reached its shard
        # proves it, so that task runs again once.
        if attempt == 1:
            raise MsmError(f"{len(missing)} plan rows never reached a staged shard (e.g. {missing[0]})",
                           f"see the task logs under {logs / 'logs'}")


def _submit_to_slurm(ctx_path: str, staged: Path, logs: Path, opts: BuildOptions, plan, build_id: str) -> str | None:
    """Submit the tasks that still have work; None when every row is staged (time to load)."""
    from pipelines.cluster import SlurmSettings, submit_slurm

    reopen = _unfinished_tasks(staged, {r.id: i % opts.tasks for i, r in enumerate(plan)})
    if not reopen:
        return None
    _reopen(logs, staged, reopen)
    job, script = submit_slurm(_pipeline(ctx_path, staged), opts.tasks, opts.workers, logs, f"msm-{build_id}",
                               opts.slurm or SlurmSettings(), opts.dry_run)
    if job is None:
        return f"dry run: wrote {script} for {len(reopen)} task(s); submit it with `sbatch {script}`, then rerun"
    return (f"submitted Slurm job {job} for {len(reopen)} task(s) (script {script}); when it ends, run the "
            "same command again to load the corpus")


def _load(db, build_id: str, rows: list[dict], counter, ctx, corpus_name: str | None, allow_partial: bool = False,
          lock_wait: float = LOAD_LOCK_WAIT_S) -> dict:
    from msm.llm.cache import CallCache
    from warehouse.corpus_load import load_build, prepare_load

    ids = [r["id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise MsmError(f"build {build_id}: a plan row was staged twice", f"remove {ctx.staged_dir} and rerun")
    cache = CallCache(ctx.cache_dir)
    try:
        prepared = prepare_load(rows, counter, cache)  # all the reading and counting, before the lock
    finally:
        cache.close()
    con = _connect_waiting(db, lock_wait, build_id)
    try:
        return load_build(con, build_id, prepared, corpus_name=corpus_name, allow_partial=allow_partial)
    finally:
        con.close()


def _summarise(db, build_id, name, result, planned, counter_name, seconds, counts,
               lock_wait: float = LOAD_LOCK_WAIT_S) -> BuildResult:
    con = _connect_waiting(db, lock_wait, build_id, read_only=True)
    try:
        reasons = dict(con.execute(
            "SELECT coalesce(reason, status), count(*) FROM plan_rows "
            "WHERE build_id = ? AND status != 'kept' GROUP BY 1 ORDER BY 2 DESC", [build_id]).fetchall())
        kept_tokens = con.execute("SELECT coalesce(sum(n_tokens), 0) FROM documents WHERE build_id = ? AND "
                                  "status = 'kept'", [build_id]).fetchone()[0]
        cost = con.execute("SELECT coalesce(sum(cost_usd), 0) FROM cost_per_build WHERE build_id = ?",
                           [build_id]).fetchone()[0]
        per_genre = {g: (k, d) for g, k, d in con.execute(
            "SELECT genre, count(*) FILTER (WHERE status = 'kept'), count(*) FILTER (WHERE status != 'kept') "
            "FROM plan_rows WHERE build_id = ? GROUP BY 1 ORDER BY 1", [build_id]).fetchall()}
    finally:
        con.close()
    return BuildResult(build_id, name if result["corpus_id"] else None, result["corpus_id"], planned, counts, reasons,
                       int(kept_tokens), counter_name, float(cost), seconds, per_genre, result["complete"])
