"""Keeping datatrove's per-task INFO logs out of the terminal (they stay in the task log files)."""

from __future__ import annotations

import os
import sys


# datatrove warnings that are expected in a build: MinHash finding no duplicates at all
EXPECTED = ("No .remove file",)


def _to_terminal(record) -> bool:
    """Warnings only: an error's trace goes to the task's log file, and the build prints one line
    naming its own log (builds/B/logs/build.log), where the full trace is written too."""
    return record["level"].no < 40 and not record["message"].startswith(EXPECTED)


class _LogFile:
    """A task's log file that a full disk cannot turn into noise: loguru would print each failed
    write as a block on stderr, while the build reports the full disk in one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, message: str) -> None:
        try:
            self.stream.write(message)
        except OSError:
            pass

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            pass


def quiet_task_logs() -> None:
    """datatrove sends every task's INFO log to stderr; keep it in the task's log file only.

    Worker processes inherit MSM_QUIET_DATATROVE and call this when they import the steps.
    """
    os.environ["MSM_QUIET_DATATROVE"] = "1"
    os.environ["LOGURU_LEVEL"] = "WARNING"  # the level of the handler datatrove re-adds after a task
    import datatrove.executor.base as executor_base
    from datatrove.utils import logging as dt_logging
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}", filter=_to_terminal)
    original = dt_logging.add_task_logger
    if getattr(executor_base.add_task_logger, "msm_quiet", False):
        return

    def add_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
        real_stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # the handler it adds writes nowhere
        try:
            logfile = original(logging_dir, rank, local_rank, node_rank=node_rank)
        finally:
            sys.stderr.close()
            sys.stderr = real_stderr
        logger.remove()
        logger.add(_LogFile(logfile), level="DEBUG")
        logger.add(sys.stderr, level="WARNING", format="{level}: {message}", filter=_to_terminal)
        return logfile

    def close_task_logger(logfile):
        closing(logfile)  # datatrove re-adds its INFO logger to stderr here; take it back off
        logger.remove()
        logger.add(sys.stderr, level="WARNING", format="{level}: {message}", filter=_to_terminal)

    closing = dt_logging.close_task_logger
    add_task_logger.msm_quiet = True
    executor_base.add_task_logger = add_task_logger
    executor_base.close_task_logger = close_task_logger
