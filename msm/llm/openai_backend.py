"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama) through the `openai` SDK.

Chat answers stream, so the idle timeout measures silence, not length: a long answer that keeps
coming is never cut, a stalled one is. Waiting for the first token (a request queued behind
others on a busy server) has its own, longer limit.

Scoring asks for what every such server implements the same way: the next token's top log-probs
after a context, one prompt per request. `echo` (the prompt's own log-probs, needed only for
continuations of several tokens) is used only once a self-check has shown the server aligns it:
llama.cpp's reports each token's log-prob one position late.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time

from msm.llm.base import Backend, FatalError, Score, ScoreItem, TransientError, classify_sdk_error
from msm.llm.types import Request, Response, Usage

FINISH = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal", "tool_calls": "end_turn"}
TOP_LOGPROBS = (20, 10, 5, 2, 1)  # asked in turn until the server accepts one (vLLM allows 20 by default)
ECHO_TOLERANCE = 0.1  # nats between a token's echo log-prob and its next-token log-prob on an aligned server
ECHO_CHECK_CONTEXT = "Question: What is the capital of France?\nAnswer:"
SPACE_MARKS = (" ", "\u2581", "\u0120")  # a leading space as decoded, as SentencePiece shows it, as GPT-2 BPE does
SLOTS_TIMEOUT = 5.0


def bare(token: str) -> str:
    """A token without one leading space: " A" and "A" both answer an option "A"."""
    return token[1:] if token[:1] in SPACE_MARKS else token


def single_token(continuation: str) -> bool:
    """A continuation read from the next token's top log-probs: one word or mark, no inner space."""
    word = bare(continuation)
    return bool(word) and not re.search(r"\s", word)


def pick(top: dict[str, float], continuation: str, k: int) -> Score:
    """The option's log-prob among the top k next tokens (the best of its spellings with and without a
    leading space); absent, the item is an error, never a guess."""
    matches = [(lp, tok) for tok, lp in top.items() if bare(tok) == bare(continuation)]
    if not matches:
        return Score.failed(f"{continuation!r} is not among the server's top {k} next tokens (rare, or more than "
                            f"one token for this model)")
    lp, tok = max(matches)
    return Score(lp, [lp], [tok])


class OpenAIBackend(Backend):
    name = "openai"
    score_chunk = 1  # one prompt per request: llama.cpp answers a list with HTTP 500
    score_version = 2  # next-token top log-probs, leading-space tolerant (1 was echo of every option)

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 idle_timeout: float = 120.0, connect_timeout: float = 10.0, first_byte_timeout: float = 600.0):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise FatalError("the openai backend needs a server URL",
                             "pass --base-url http://host:port/v1 or set OPENAI_BASE_URL")
        import httpx2
        import openai

        self._sdk = openai
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers take any key
        self.default_model = model or os.environ.get("MSM_OPENAI_MODEL") or ""
        self.idle_timeout = idle_timeout
        self.first_byte_timeout = max(first_byte_timeout, idle_timeout)
        self.connect_timeout = connect_timeout
        # httpx's read timeout is the longest wait for any byte (the first, after queueing); the
        # shorter silence limit mid-answer is enforced per chunk in `_read_stream`.
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                         timeout=httpx2.Timeout(self.first_byte_timeout, connect=connect_timeout))
        self.top_k = TOP_LOGPROBS[0]  # lowered, once, to what the server accepts
        self._echo_verified: bool | None = None
        self._echo_lock: asyncio.Lock | None = None

    def classify(self, exc: Exception) -> Exception:
        return classify_sdk_error(exc, self._sdk, self.api_key, f"the server at {self.base_url}", "OPENAI_API_KEY")

    # ---- chat ----------------------------------------------------------------------------
    def chat_params(self, request: Request, model: str) -> dict:
        messages = []
        system = "".join(part for part in (request.system_prefix, request.system) if part)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        kwargs: dict = {"model": model, "messages": messages, "max_tokens": request.max_tokens,
                        "temperature": request.temperature, "stream": True,
                        "stream_options": {"include_usage": True}}
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if request.seed is not None:
            kwargs["seed"] = request.seed
        return kwargs

    async def call(self, request: Request, model: str) -> Response:
        started = time.monotonic()
        try:
            stream = await self.client.chat.completions.create(**self.chat_params(request, model))
            async with stream:  # an abandoned answer (timed out, cancelled) closes its connection
                text, finish, usage, pieces = await self._read_stream(stream)
            if usage == Usage() and pieces:
                usage = _unreported_usage(request, pieces)
        except TransientError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified into retry or fail
            raise self.classify(exc) from None
        reason = FINISH.get(finish, finish)
        if reason == "end_turn" and not text.strip():
            reason = "empty"
        return Response(text=text, stop_reason=reason, usage=usage, latency_s=time.monotonic() - started,
                        backend=self.name, model=model)

    async def _read_stream(self, stream) -> tuple[str, str, Usage]:
        """(text, finish reason, usage, content chunks) from the chunks. The first chunk may wait
        `first_byte_timeout` (the request queued on a busy server); after it, a silence longer than
        `idle_timeout` is a stall. Usage stays zero when the server sends no usage chunk."""
        parts, finish, usage = [], None, Usage()
        chunks = stream.__aiter__()
        first = True
        while True:
            limit = self.first_byte_timeout if first else self.idle_timeout
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), limit)
            except StopAsyncIteration:
                break
            except TimeoutError:
                if first:
                    raise TransientError(f"no answer from {self.base_url} within {limit:g} s") from None
                raise TransientError(f"the answer from {self.base_url} went silent for {limit:g} s "
                                     "(--timeout sets this limit)") from None
            first = False
            if chunk.usage:
                usage = _usage(chunk.usage)
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                finish = choice.finish_reason or finish
        if finish is None:
            raise TransientError(f"the answer from {self.base_url} ended without a finish reason (cut off)")
        return "".join(parts), finish, usage, len(parts)

    async def ping(self, model: str) -> str:
        """One tiny completion to the named model; an unknown name fails naming the ones served. The
        served list is read first: a one-model server (llama-cpp-python) answers under any name."""
        served = await self._served_models()
        if served and model not in served.split(", "):
            raise FatalError(f"the server at {self.base_url} does not serve model '{model}' (it serves: {served})",
                             "pass one of them as --model")
        try:
            return await super().ping(model)
        except FatalError as exc:
            if "HTTP 404" not in exc.problem:
                raise
            served = await self._served_models()
            raise FatalError(f"the server at {self.base_url} does not serve model '{model}'"
                             + (f" (it serves: {served})" if served else ""), "pass one of them as --model") from None

    async def _served_models(self) -> str:
        try:
            models = await self.client.models.list()
        except Exception:  # noqa: BLE001 - only a hint for the error above
            return ""
        return ", ".join(m.id for m in models.data)

    async def slots(self) -> int | None:
        """How many requests the server runs at once, from llama.cpp's `GET /slots` at the server root;
        None where the server has no such route or does not answer."""
        import httpx2

        root = re.sub(r"/v1$", "", self.base_url)
        try:
            async with httpx2.AsyncClient(timeout=SLOTS_TIMEOUT) as http:
                reply = await http.get(f"{root}/slots", headers={"Authorization": f"Bearer {self.api_key}"})
            listed = reply.json() if reply.status_code == 200 else None
        except Exception:  # noqa: BLE001 - no slots is an answer, not an error
            return None
        return len(listed) if isinstance(listed, list) and listed else None

    # ---- scoring -------------------------------------------------------------------------
    async def score(self, items: list[ScoreItem], model: str) -> list[list[Score]]:
        return [await self._score_item(item, model) for item in items]

    async def _score_item(self, item: ScoreItem, model: str) -> list[Score]:
        if all(single_token(c) for c in item.continuations):
            top = await self.next_token_logprobs(item.context, model)
            return [pick(top, c, self.top_k) for c in item.continuations]
        await self._verify_echo(model)
        return [await self._echo_score(item.context, c, model) for c in item.continuations]

    async def next_token_logprobs(self, context: str, model: str) -> dict[str, float]:
        """The top log-probs of the token after `context`, asking for as many as the server allows."""
        k = self.top_k
        while True:
            try:
                completion = await self.client.completions.create(model=model, prompt=context, max_tokens=1,
                                                                  logprobs=k, temperature=0.0)
                break
            except self._sdk.BadRequestError as exc:
                lower = [n for n in TOP_LOGPROBS if n < k]
                if not lower or "logprob" not in str(exc).lower():  # refused for another reason
                    raise self.classify(exc) from None
                k = lower[0]
            except Exception as exc:  # noqa: BLE001
                raise self.classify(exc) from None
        self.top_k = min(self.top_k, k)  # the server caps logprobs: ask for no more from now on
        lp = completion.choices[0].logprobs if completion.choices else None
        if lp is None or not lp.top_logprobs or lp.top_logprobs[0] is None:
            raise FatalError(f"the server at {self.base_url} returned no top log-probs for model '{model}'",
                             "serve the model with vLLM or llama.cpp (--logits_all), or evaluate with --mode generate")
        return dict(lp.top_logprobs[0])

    async def _echo(self, prompt: str, model: str):
        try:
            completion = await self.client.completions.create(model=model, prompt=prompt, max_tokens=1, echo=True,
                                                              logprobs=0, temperature=0.0)
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        return completion.choices[0].logprobs

    async def _echo_score(self, context: str, continuation: str, model: str) -> Score:
        """log P(continuation | context) from the echoed prompt's token log-probs."""
        prompt = context + continuation
        lp = await self._echo(prompt, model)
        start, picked = len(context), []
        for tok, p, off in zip(lp.tokens or [], lp.token_logprobs or [], lp.text_offset or []):
            if off < start < off + len(tok):
                return Score.failed(f"the server's tokens merge {continuation!r} with the end of its context")
            if start <= off < len(prompt) and p is not None:  # past the prompt: the generated token
                picked.append((tok, p))
        if not picked:
            return Score.failed(f"the server returned no log-probs for {continuation!r}")
        return Score(sum(p for _, p in picked), [p for _, p in picked], [t for t, _ in picked])

    async def _verify_echo(self, model: str) -> None:
        """Once per backend: the likeliest next token after a known context must get the same
        log-prob from `echo` (the token appended to the prompt) as from `top_logprobs`."""
        if self._echo_lock is None:
            self._echo_lock = asyncio.Lock()
        async with self._echo_lock:
            if self._echo_verified is None:
                self._echo_verified = await self._echo_agrees(model)
        if not self._echo_verified:
            raise FatalError(f"the server at {self.base_url} reports prompt log-probs (echo) that disagree with its "
                             "next-token log-probs (llama.cpp shifts them by one token), so continuations of several "
                             "tokens cannot be scored there",
                             "score single-token options (letters), or serve the model with vLLM")

    async def _echo_agrees(self, model: str) -> bool:
        top = await self.next_token_logprobs(ECHO_CHECK_CONTEXT, model)
        for token, expected in sorted(top.items(), key=lambda kv: -kv[1]):
            if not token.strip():
                continue
            score = await self._echo_score(ECHO_CHECK_CONTEXT, token, model)
            if score.ok and score.tokens == [token]:  # the token stayed one token when appended
                return math.isclose(score.total, expected, abs_tol=ECHO_TOLERANCE)
        return False

    async def aclose(self) -> None:
        await self.client.close()


def _unreported_usage(request: Request, pieces: int) -> Usage:
    """Usage for a server that streams none (llama-cpp-python ignores `stream_options`): the answer's
    tokens are its content chunks (llama.cpp and vLLM stream one token a chunk), the prompt's an
    estimate at four characters a token. Asking the server to count the prompt would queue behind
    the answers on a one-request-at-a-time server and hold each answer back from the cache."""
    texts = [request.system_prefix or "", request.system or ""] + [m.content for m in request.messages]
    return Usage(max(1, sum(len(t) for t in texts) // 4), pieces, 0, 0)


def _usage(u) -> Usage:
    details = getattr(u, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    return Usage((u.prompt_tokens or 0) - cached, u.completion_tokens or 0, cached, 0)
