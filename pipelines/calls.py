"""Model calls for the pipeline steps of one datatrove task: one client, one event loop.

Steps are generators that datatrove chains, so a document can be judged while others are still
being written, and filters run while calls are in flight. All steps of a task share one client
on one background event loop: `--concurrency` bounds their calls together, and `--max-cost`
is one budget for the task, not one per step.

API backends stream: a request starts when it is submitted. The Batch API and local models
want whole lists, so there requests wait until a step asks for everything outstanding, then go
as one `complete_many` (one batch submission, or batched generation on the local model).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from msm.llm.types import Request, Response

_TASKS: dict[tuple[str, int], "TaskCalls"] = {}
_STOP: list[int] = []  # signals received by this process's build (pipelines.build installs the handler)


class Interrupted(BaseException):
    """SIGINT or SIGTERM asked the build to stop: a BaseException, so no `except Exception` on the
    way up swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def request_stop(signum: int) -> None:
    _STOP.append(signum)
    raise Interrupted(signum)


def check_stop() -> None:
    """Raise again at a safe point when the handler's own raise was swallowed (a signal that lands
    in a garbage-collector callback is printed and ignored by Python)."""
    if _STOP:
        raise Interrupted(_STOP[0])


def clear_stop() -> None:
    _STOP.clear()


class TaskCalls:
    def __init__(self, ctx, rank: int, world_size: int):
        from msm.llm.cache import CallCache
        from msm.llm.client import LLMClient
        from msm.llm.select import effective_concurrency, make_backend

        backend, model = make_backend(ctx.backend, ctx.model, ctx.base_url, idle_timeout=ctx.idle_timeout,
                                      first_byte_timeout=getattr(ctx, "first_byte_timeout", 600.0))
        total = effective_concurrency(ctx.concurrency, server_slots(backend))
        budget = ctx.max_cost / world_size if ctx.max_cost is not None else None
        shard = None if ctx.executor == "local" else f"rank{rank:05d}"  # SQLite locks are unsafe on NFS
        self.cache = CallCache(ctx.cache_dir, shard=shard)
        self.client = LLMClient(backend, model=model, cache=self.cache, max_cost=budget,
                                concurrency=max(1, total // max(1, ctx.workers)), batch_poll_s=ctx.batch_poll_s)
        self.bars: dict[str, Any] = {}  # stage (= request purpose) -> its Progress, for retries
        self.client.on_retry = self._retrying
        self.batch = ctx.batch
        self.streaming = not ctx.batch and not getattr(backend, "batched", False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="msm-calls", daemon=True)
        self.thread.start()

    async def _shutdown(self) -> None:
        """Cancel the calls still in flight (a step stopped early: an error, a signal), then close
        the backend, so nothing is left pending when the loop closes."""
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.client.backend.aclose()

    def _retrying(self, request: Request, reason: str) -> None:
        bar = self.bars.get(request.purpose)
        if bar is not None:
            bar.retry(reason)

    @property
    def model(self) -> str:
        return self.client.model

    def run(self, coroutine) -> Any:
        """Run a coroutine on the task's loop and wait for it (errors are raised here)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        # at interpreter exit (a SIGTERM'd build collecting a step's generator) the loop's daemon
        # thread no longer runs: waiting on it would hang the process after its one line
        if sys.is_finalizing() or not self.thread.is_alive():
            self.cache.close()
            return
        try:
            self.run(self._shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()
            self.cache.close()


def server_slots(backend) -> int | None:
    """The requests a server runs at once, where it says (llama.cpp's /slots): more would only queue
    there. Asked on a loop of its own, since the task's loop is not running yet."""
    slots = getattr(backend, "slots", None)
    if slots is None:
        return None
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, slots()).result()


def task_calls(ctx, rank: int, world_size: int) -> TaskCalls:
    """The task's shared calls, made on first use; `release` ends them."""
    key = (ctx.build_id, rank)
    if key not in _TASKS:
        _TASKS[key] = TaskCalls(ctx, rank, world_size)
    return _TASKS[key]


def release(ctx, rank: int) -> None:
    calls = _TASKS.pop((ctx.build_id, rank), None)
    if calls is not None:
        calls.close()


class Channel:
    """One step's requests and their answers, in the order the answers arrive.

    `submit(request, tag)` starts a call; `ready()` yields the (tag, response) pairs that have
    arrived, without waiting; `drain()` waits for every outstanding one, including those
    submitted while draining (a regrow, a second judge question).
    """

    def __init__(self, calls: TaskCalls, progress=None):
        self.calls = calls
        self.progress = progress or (lambda response: None)  # called once for each answer
        if getattr(progress, "stage", None):
            calls.bars[progress.stage] = progress
        self.inbox: queue.Queue = queue.Queue()
        self.outstanding = 0
        self.queued: list[tuple[Any, Request]] = []

    def submit(self, request: Request, tag: Any) -> None:
        check_stop()
        self.outstanding += 1
        if not self.calls.streaming:
            self.queued.append((tag, request))
            return
        future = asyncio.run_coroutine_threadsafe(self.calls.client.complete_one(request), self.calls.loop)
        future.add_done_callback(lambda done: self.inbox.put((tag, done)))

    def ready(self) -> Iterator[tuple[Any, Response]]:
        check_stop()
        while True:
            try:
                tag, done = self.inbox.get_nowait()
            except queue.Empty:
                return
            yield self._take(tag, done)

    def drain(self) -> Iterator[tuple[Any, Response]]:
        while self.outstanding:
            check_stop()
            if self.queued and self.inbox.empty():
                self._flush()
            tag, done = self.inbox.get()
            yield self._take(tag, done)

    def _take(self, tag, done) -> tuple[Any, Response]:
        self.outstanding -= 1
        response = done.result()  # a fatal error (bad key, unknown model) is raised in the step
        if not isinstance(done, _Done):
            self.progress(response)
        return tag, response

    def _flush(self) -> None:
        """A whole list at once; the client reports each answer as its model batch finishes."""
        items, self.queued = self.queued, []
        client = self.calls.client
        client.on_result = self.progress
        try:
            responses = self.calls.run(client.complete_many([r for _, r in items], batch=self.calls.batch))
        finally:
            client.on_result = None
        for (tag, _), response in zip(items, responses):
            self.inbox.put((tag, _Done(response)))


class _Done:
    """A finished result in the shape of a concurrent.futures.Future."""

    def __init__(self, value: Response):
        self.value = value

    def result(self) -> Response:
        return self.value
