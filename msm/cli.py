"""The `msm` command. Stage groups are mounted lazily so `msm --help` stays fast and light."""

from __future__ import annotations

import errno
import importlib
import sys

import click

from msm import __version__
from msm.errors import MsmError

# group name -> "module:attribute". Each stage owns its group; msm only mounts it.
STAGE_GROUPS = {
    "cache": "msm.llm.cli:cache_group",
    "corpus": "corpus.corpus_cli:corpus_group",
    "demos": "corpus.demos_cli:demos_group",
    "eval": "eval.cli:eval_group",
    "experiment": "msm.experiment_cli:experiment_group",
    "llm": "msm.llm.cli:llm_group",
    "spec": "corpus.cli:spec_group",
    "train": "train.cli:train_group",
    "warehouse": "warehouse.cli:warehouse_group",
}


class MsmGroup(click.Group):
    """Mounts stage groups on demand and turns MsmError, and a damaged warehouse block met mid-query by
    any command, into one line on stderr."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(STAGE_GROUPS))

    def get_command(self, ctx, name):
        if name in STAGE_GROUPS:
            module, attr = STAGE_GROUPS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # before click consumes them
        try:
            return super().invoke(ctx)
        except MsmError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            full = _storage_error(exc)
            if full is None:
                raise
            raise click.ClickException(str(full)) from None
        except Exception as exc:
            damage = _warehouse_damage(exc, args)
            if damage is None:
                raise
            raise click.ClickException(str(damage)) from None


STORAGE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "the operation is not permitted"}


def _storage_error(exc: OSError) -> MsmError | None:
    """One line for a write the file system refused (a full disk, a quota, a read-only mount),
    wherever it happened; every stage keeps finished work (call cache, staged shards), so a rerun
    after the fix pays nothing again."""
    what = STORAGE_ERRORS.get(exc.errno)
    if what is None:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return MsmError(f"{what}{where}", "free space or fix the permissions (or point MSM_HOME / --db elsewhere), "
                    "then rerun the same command: finished work is kept")


def _db_flag(args: list[str]) -> str | None:
    """The value of a `--db PATH` or `--db=PATH` among the subcommand's arguments, if any."""
    for i, arg in enumerate(args):
        if arg == "--db" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--db="):
            return arg.split("=", 1)[1]
    return None


def _warehouse_damage(exc: BaseException, args: list[str]) -> MsmError | None:
    """The one-line error for a DuckDB error that says the warehouse file is damaged (a bad block read
    mid-query by a command that does not check for it itself), else None. duckdb is only looked up when
    it is already imported, so `msm --help` stays light."""
    duckdb = sys.modules.get("duckdb")
    if duckdb is None or not isinstance(exc, duckdb.Error):
        return None
    from msm.config import load_settings
    from warehouse.db import damaged, is_damage

    if not is_damage(exc):
        return None
    try:
        path = load_settings(_db_flag(args)).db
    except MsmError:
        path = "(the warehouse)"
    return damaged(path, exc)


@click.group(cls=MsmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msm")
def cli():
    """msm: compile a Model Spec into a midtraining corpus, then train and evaluate on it."""


@cli.group("models")
def models_group():
    """Local models: SmolLM2-135M-Instruct (generation) and MiniLM (embeddings)."""


@models_group.command("list")
def models_list():
    """Show the model aliases and whether each is ready."""
    from msm.models import list_models

    for row in list_models():
        star = "*" if row["default"] else " "
        click.echo(f"{star} {row['alias']:<24} {row['kind']:<10} {row['status']:<36} {row['where']}")


@models_group.command("prepare")
@click.argument("alias", required=False)
@click.option("--force", is_flag=True, help="Convert again even if the cache exists.")
def models_prepare(alias, force):
    """Convert the bundled GGUF to a safetensors cache (once) and check the embedder."""
    from msm.models import prepare, resolve_embedder

    prepare(alias, force=force, log=click.echo)
    if alias is None:
        click.echo(f"all-minilm-l6-v2: ready at {resolve_embedder()}")


@cli.command("doctor")
def doctor():
    """Check the install and say how to fix what is wrong."""
    from msm.doctor import run_checks

    failed = 0
    for check in run_checks():
        mark = "ok  " if check.ok else ("warn" if check.warn_only else "FAIL")
        line = f"[{mark}] {check.name}: {check.detail}"
        if not check.ok and check.fix:
            line += f"  -> {check.fix}"
        click.echo(line)
        failed += not check.ok and not check.warn_only
    if failed:
        click.echo(f"{failed} problem(s) found", err=True)
        sys.exit(1)
    click.echo("all checks passed")


def main():
    try:
        cli(prog_name="msm")
    except BrokenPipeError:  # `msm ... | head`
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
