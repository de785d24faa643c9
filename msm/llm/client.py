"""The client every stage calls: cache first, bounded concurrency, retries, budget, batches.

`complete_many(requests)` returns one Response per request, in order. A response is an answer
(possibly a refusal or a truncation, flagged as such), an error that survived every retry
(`error` set), or `pending` when the budget ran out before it started. Nothing is lost: a rerun
serves finished work from the cache and makes only the missing calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import json
import random
from dataclasses import asdict, dataclass
from typing import Callable

from msm.llm.base import Backend, FatalError, Score, ScoreItem, TransientError
from msm.llm.cache import CacheError, CallCache
from msm.llm.pricing import PriceTable, estimate, load_prices
from msm.llm.types import Request, Response, Usage

# The Message Batches API takes at most 100,000 requests or 256 MB per batch (Anthropic's documented
# limits). msm sends at most 10,000 (a smaller batch ends sooner and loses less to an expiry) and
# keeps a batch's request text under 200 MB, a margin for the JSON around it: at 40M tokens, 10,000
# generation requests that each carry a 17 kB spec prefix come to about 250 MB.
MAX_BATCH_ITEMS = 10_000
MAX_BATCH_BYTES = 200_000_000
BATCH_ITEM_OVERHEAD = 512  # bytes of JSON (custom_id, model, parameters) around a request's text
SCORE_CHUNK = 64  # score items (each with its continuations) per scoring call


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    # Benchmarks only: every delay of the policy divided by this factor, so a run at 1/time_scale of
    # real durations (server latency, retry-after, timeouts alike) keeps the shipped policy's shape.
    time_scale: float = 1.0

    # A 429 comes to every request in flight at once (the bucket is empty for all of them), each
    # with the same retry-after: waiting exactly that long sends them back together, into the next
    # 429. Each waits retry-after plus up to this share of it, drawn at random.
    retry_after_spread: float = 0.25

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; a server's retry-after, spread, is a floor."""
        backoff = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) / self.time_scale)
        if not retry_after:
            return backoff
        return max(backoff, retry_after * (1 + random.uniform(0, self.retry_after_spread)))


class PriorityGate:
    """A semaphore whose waiters are served by priority, then arrival: retries jump the queue.

    With hundreds of requests queued, a retry sent to the back of a FIFO queue would finish
    last and stretch the run's tail; served first, it overlaps with the fresh work.
    """

    def __init__(self, slots: int):
        self.free = slots
        self.waiters: list[tuple[int, int, asyncio.Future]] = []
        self.arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiters, (priority, next(self.arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self.waiters:
            _, _, future = heapq.heappop(self.waiters)
            if not future.done():
                future.set_result(None)
                return
        self.free += 1

    @contextlib.asynccontextmanager
    async def slot(self, priority: int = 0):
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()


@dataclass
class RunStats:
    calls: int = 0  # HTTP calls or local generations actually made
    cache_hits: int = 0
    retries: int = 0
    errors: int = 0
    pending: int = 0
    spent_usd: float = 0.0


class LLMClient:
    def __init__(self, backend: Backend, model: str | None = None, cache: CallCache | None = None,
                 prices: PriceTable | None = None, max_cost: float | None = None, concurrency: int = 8,
                 retry: RetryPolicy | None = None, batch_poll_s: float = 30.0,
                 on_result: Callable[[Response], None] | None = None):
        self.backend = backend
        self.model = model or backend.default_model
        if not self.model:
            raise FatalError(f"the {backend.name} backend needs a model name", "pass --model")
        self.cache = cache
        self.prices = prices or load_prices()
        self.prices.cost(backend.name, self.model, Usage())  # unknown model: fail now, not after spending
        self.max_cost = max_cost
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.batch_poll_s = batch_poll_s
        self.on_result = on_result
        self.on_retry: Callable[[Request, str], None] | None = None  # a call about to be tried again, and why
        self.stats = RunStats()
        self._warm: dict[str, asyncio.Event] = {}
        self._gate: PriorityGate | None = None  # complete_one's; made inside the running loop
        self._unstorable: CacheError | None = None  # set by the first answer the cache could not store

    # ---- public ------------------------------------------------------------------------
    def key(self, request: Request) -> str:
        return request.key(self.backend.name, self.model)

    def budget_left(self) -> bool:
        return self.max_cost is None or self.stats.spent_usd < self.max_cost

    def estimate(self, requests: list[Request], batch: bool = False) -> dict:
        return estimate(requests, self.backend.name, self.model, self.prices, batch=batch)

    async def complete_many(self, requests: list[Request], batch: bool = False) -> list[Response]:
        keys = [self.key(r) for r in requests]
        done: dict[str, Response] = {}
        todo: dict[str, Request] = {}
        for key, request in zip(keys, requests):
            if key in done or key in todo:
                continue  # the same request twice in one call is made once
            hit = self.cache.get(key) if self.cache else None
            if hit is not None:
                self.stats.cache_hits += 1
                done[key] = hit
                self._notify(hit)
            else:
                todo[key] = request
        if todo:
            if batch and getattr(self.backend, "supports_batch", False):
                done.update(await self._run_batches(todo))
            elif getattr(self.backend, "batched", False):
                done.update(await self._run_local(todo))
            else:
                done.update(await self._run_concurrent(todo))
        return [done[k] for k in keys]

    async def complete_one(self, request: Request) -> Response:
        """One request under the client's shared gate, so callers that stream requests in one by
        one (the corpus pipeline's steps) still keep at most `concurrency` calls in flight."""
        key = self.key(request)
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            self.stats.cache_hits += 1
            self._notify(hit)
            return hit
        if self._gate is None:
            self._gate = PriorityGate(self.concurrency)
        return await self._one(key, request, self._gate)

    def complete(self, requests: list[Request], batch: bool = False) -> list[Response]:
        """Synchronous convenience wrapper around complete_many."""
        return asyncio.run(self._complete_and_close(requests, batch))

    async def _complete_and_close(self, requests, batch):
        try:
            return await self.complete_many(requests, batch=batch)
        finally:
            await self.backend.aclose()

    def score_key(self, item: ScoreItem) -> str:
        body = {"kind": "score", "backend": self.backend.name, "model": self.model, "context": item.context,
                "continuations": list(item.continuations)}
        version = getattr(self.backend, "score_version", None)
        if version is not None:  # a new scoring method: scores stored by the old one are not served for it
            body["method"] = version
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    async def score_many(self, items: list[ScoreItem]) -> list[list[Score]]:
        """Log-probabilities, through the call cache like every other request: scores already stored
        are served from it, the rest are asked in parts the backend takes at once (one prompt per
        request on a server, SCORE_CHUNK items on a local model), concurrently up to `concurrency`
        on a server, retried like any call, and stored as they come, so a crash after some calls
        loses none of them and a rerun pays only for what is missing. A score the server could not
        give (`Score.error`) is returned but not stored: a rerun asks again."""
        keys = [self.score_key(item) for item in items]
        done: dict[str, list[Score]] = {}
        todo: dict[str, ScoreItem] = {}
        for key, item in zip(keys, items):
            if key in done or key in todo:
                continue
            hit = self.cache.get(key) if self.cache else None
            if hit is not None and hit.stop_reason == "score":
                self.stats.cache_hits += 1
                done[key] = [Score(**s) for s in json.loads(hit.text)]
            else:
                todo[key] = item
        pending = list(todo.items())
        size = max(1, getattr(self.backend, "score_chunk", SCORE_CHUNK))
        parts = [pending[start:start + size] for start in range(0, len(pending), size)]
        # a local model runs one scoring pass at a time; a server takes `concurrency` requests at once
        gate = PriorityGate(1 if getattr(self.backend, "batched", False) else self.concurrency)
        try:
            async with asyncio.TaskGroup() as group:
                for part in parts:
                    group.create_task(self._score_part(part, gate, done))
        except* (FatalError, CacheError) as eg:
            raise eg.exceptions[0] from None
        return [done[k] for k in keys]

    async def _score_part(self, part: list[tuple[str, ScoreItem]], gate: PriorityGate,
                          done: dict[str, list[Score]]) -> None:
        """One scoring call, retried with the client's policy; it ends in one line, never a traceback."""
        last: TransientError | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            async with gate.slot(priority=-attempt):
                self._check_storable()
                self.stats.calls += 1
                try:
                    scores = await self.backend.score([item for _, item in part], self.model)
                except TransientError as exc:
                    last = exc
                else:
                    for (key, item), score in zip(part, scores):
                        self._store_score(key, item, score)
                        done[key] = score
                    return
            if attempt < self.retry.max_attempts:
                self.stats.retries += 1
                await asyncio.sleep(self.retry.delay(attempt, last.retry_after if last else None))
        self.stats.errors += 1
        raise FatalError(f"scoring with {self.backend.name} model '{self.model}' failed after "
                         f"{self.retry.max_attempts} attempts: {last}",
                         "check that the server is up and not overloaded, then rerun "
                         "(scores already received are kept)")

    def _store_score(self, key: str, item: ScoreItem, score: list[Score]) -> None:
        if self.cache is None or not all(s.ok for s in score):
            return
        try:
            self.cache.put_record(key, self.backend.name, self.model, "eval",
                                  {"score": {"context": item.context, "continuations": list(item.continuations)}},
                                  json.dumps([asdict(s) for s in score]), "score")
        except CacheError as exc:
            self._unstorable = exc
            raise

    # ---- one request at a time, many at once ------------------------------------------
    async def _run_concurrent(self, todo: dict[str, Request]) -> dict[str, Response]:
        gate = PriorityGate(self.concurrency)
        results: dict[str, Response] = {}

        async def run(key: str, request: Request) -> None:
            results[key] = await self._one(key, request, gate)

        try:
            async with asyncio.TaskGroup() as group:
                for key, request in todo.items():
                    group.create_task(run(key, request))
        except* (FatalError, CacheError) as eg:
            raise eg.exceptions[0] from None
        return results

    async def _one(self, key: str, request: Request, gate: PriorityGate) -> Response:
        prefix = request.system_prefix
        leader = False
        if prefix:
            # The first request with a new cacheable prefix goes alone, so the others read the cache.
            event = self._warm.get(prefix)
            if event is None:
                self._warm[prefix] = event = asyncio.Event()
                leader = True
            else:
                await event.wait()
        try:
            return await self._attempts(key, request, gate)
        finally:
            if leader:
                self._warm[prefix].set()

    async def _attempts(self, key: str, request: Request, gate: PriorityGate) -> Response:
        last: TransientError | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            async with gate.slot(priority=-attempt):
                self._check_storable()
                if not self.budget_left():
                    return self._pending(key)
                self.stats.calls += 1
                try:
                    response = await self.backend.call(request, self.model)
                except TransientError as exc:
                    last = exc
                    if self.on_retry and attempt < self.retry.max_attempts:
                        self.on_retry(request, str(exc))
                else:
                    return self._finish(key, request, response, attempt)
            if attempt < self.retry.max_attempts:
                self.stats.retries += 1
                await asyncio.sleep(self.retry.delay(attempt, last.retry_after if last else None))
        return self._fail(key, request, f"gave up after {self.retry.max_attempts} attempts: {last}")

    # ---- local backends: whole lists --------------------------------------------------
    async def _run_local(self, todo: dict[str, Request]) -> dict[str, Response]:
        results: dict[str, Response] = {}
        items = list(todo.items())
        chunk = max(1, getattr(self.backend, "batch_size", 16))  # one model batch at a time: progress, budget
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            if not self.budget_left():
                results.update({k: self._pending(k) for k, _ in part})
                continue
            self.stats.calls += len(part)
            responses = await self.backend.call_many([r for _, r in part], self.model)
            for (key, request), response in zip(part, responses):
                results[key] = self._finish(key, request, response, 1)
        return results

    # ---- Message Batches ----------------------------------------------------------------
    async def _run_batches(self, todo: dict[str, Request]) -> dict[str, Response]:
        """Resume batches a killed run left open, then submit what is still missing.

        Each batch id is saved before polling starts, so a restart polls the same batch
        instead of paying for it twice. Failed or expired items fall back to streaming calls.
        """
        results: dict[str, Response] = {}
        if self.cache:
            for batch_id, items in self.cache.open_batches(self.backend.name, self.model):
                collected = await self._collect(batch_id, {cid: todo.get(key) for cid, key in items.items()})
                results.update({k: v for k, v in collected.items() if k in todo})
        remaining = {k: r for k, r in todo.items() if k not in results}
        affordable, pending = self._fit_budget(remaining)
        results.update({k: self._pending(k) for k in pending})
        submitted, parts = [], batch_parts(affordable)
        while parts:  # every part submitted first, so they are processed together
            part = parts[0]
            try:
                batch_id = await self._retrying(lambda: self.backend.submit_batch(list(part.items()), self.model))
            except TransientError:
                if not submitted:
                    raise
                # refused past the retries with batches in progress: most likely the organisation's
                # queue of batch requests is full; it empties as they end, so collect them, then go on
                for collected in await asyncio.gather(*(self._collect(b, p) for b, p in submitted)):
                    results.update(collected)
                submitted = []
                continue
            self.stats.calls += 1
            if self.cache:
                self.cache.save_batch(batch_id, self.backend.name, self.model, {k: k for k in part})
            submitted.append((batch_id, parts.pop(0)))
        for collected in await asyncio.gather(*(self._collect(batch_id, part) for batch_id, part in submitted)):
            results.update(collected)
        fallback = {k: r for k, r in todo.items() if k not in results or results[k].error == "batch item failed"}
        if fallback:
            results.update(await self._run_concurrent(fallback))
        return results

    def _fit_budget(self, todo: dict[str, Request]) -> tuple[dict[str, Request], list[str]]:
        if self.max_cost is None:
            return todo, []
        fits, pending, planned = {}, [], self.stats.spent_usd
        for key, request in todo.items():
            cost = self.estimate([request], batch=True)["cost_usd"]
            if planned + cost > self.max_cost:
                pending.append(key)
            else:
                fits[key] = request
                planned += cost
        return fits, pending

    async def _collect(self, batch_id: str, requests: dict[str, Request | None]) -> dict[str, Response]:
        while not await self._retrying(lambda: self.backend.batch_ended(batch_id)):
            await asyncio.sleep(self.batch_poll_s)
        outcome = await self._retrying(lambda: self.backend.batch_results(batch_id, self.model))
        results: dict[str, Response] = {}
        for key, request in requests.items():
            item = outcome.get(key)
            if isinstance(item, Response) and request is not None:
                results[key] = self._finish(key, request, item, 1)
            elif request is not None:
                results[key] = Response(text="", stop_reason="error", error="batch item failed", key=key,
                                        backend=self.backend.name, model=self.model)
        if self.cache:
            self.cache.set_batch_status(batch_id, "collected")
        return results

    async def _retrying(self, action):
        last = None
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                return await action()
            except TransientError as exc:
                last = exc
                self.stats.retries += 1
                await asyncio.sleep(self.retry.delay(attempt, exc.retry_after))
        raise TransientError(f"gave up after {self.retry.max_attempts} attempts: {last}")

    # ---- bookkeeping -------------------------------------------------------------------
    def _finish(self, key: str, request: Request, response: Response, attempts: int) -> Response:
        response.key = key
        response.backend = self.backend.name
        response.model = self.model
        response.cost_usd = self.prices.cost(self.backend.name, self.model, response.usage, batch=response.batch)
        self.stats.spent_usd += response.cost_usd
        self._store(request, response, attempts)
        self._notify(response)
        return response

    def _store(self, request: Request, response: Response, attempts: int) -> None:
        if not self.cache:
            return
        try:
            self.cache.put(request, response, attempts)
        except CacheError as exc:
            self._unstorable = exc
            raise

    def _check_storable(self) -> None:
        """Once an answer could not be stored (a full disk), no further call starts: it would be paid
        for and lost, and paid again by the rerun."""
        if self._unstorable is not None:
            raise CacheError(self._unstorable.problem, self._unstorable.fix)

    def _fail(self, key: str, request: Request, reason: str) -> Response:
        self.stats.errors += 1
        response = Response(text="", stop_reason="error", error=reason, key=key, backend=self.backend.name,
                            model=self.model)
        self._store(request, response, self.retry.max_attempts)
        self._notify(response)
        return response

    def _pending(self, key: str) -> Response:
        self.stats.pending += 1
        return Response(text="", stop_reason="pending", key=key, backend=self.backend.name, model=self.model,
                        error=f"not started: the --max-cost budget of ${self.max_cost:.2f} was reached")

    def _notify(self, response: Response) -> None:
        if self.on_result:
            self.on_result(response)


def request_bytes(request: Request) -> int:
    """About what a request weighs in a batch upload: its text, JSON-escaped, and the fields around it."""
    texts = [request.system_prefix or "", request.system or "", *(m.content for m in request.messages)]
    return sum(len(json.dumps(t, ensure_ascii=False).encode()) for t in texts) + BATCH_ITEM_OVERHEAD


def batch_parts(requests: dict[str, Request]) -> list[dict[str, Request]]:
    """The requests in batches the API accepts: at most MAX_BATCH_ITEMS and MAX_BATCH_BYTES each."""
    parts, part, size = [], {}, 0
    for key, request in requests.items():
        weight = request_bytes(request)
        if part and (len(part) >= MAX_BATCH_ITEMS or size + weight > MAX_BATCH_BYTES):
            parts.append(part)
            part, size = {}, 0
        part[key] = request
        size += weight
    if part:
        parts.append(part)
    return parts
