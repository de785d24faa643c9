"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, Ollama) through the `openai` SDK."""

from __future__ import annotations

import os
import time

from msm.llm.base import Backend, FatalError, Score, ScoreItem, classify_sdk_error
from msm.llm.types import Request, Response, Usage

FINISH = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal", "tool_calls": "end_turn"}


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 idle_timeout: float = 120.0, connect_timeout: float = 10.0):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise FatalError("the openai backend needs a server URL",
                             "pass --base-url http://host:port/v1 or set OPENAI_BASE_URL")
        import httpx2
        import openai

        self._sdk = openai
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers take any key
        self.default_model = model or os.environ.get("MSM_OPENAI_MODEL") or ""
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=self.api_key, max_retries=0,
                                         timeout=httpx2.Timeout(idle_timeout, connect=connect_timeout))

    def classify(self, exc: Exception) -> Exception:
        return classify_sdk_error(exc, self._sdk, self.api_key, "the server", "OPENAI_API_KEY")

    async def call(self, request: Request, model: str) -> Response:
        started = time.monotonic()
        messages = []
        system = "".join(part for part in (request.system_prefix, request.system) if part)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        kwargs: dict = {"model": model, "messages": messages, "max_tokens": request.max_tokens,
                        "temperature": request.temperature}
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if request.seed is not None:
            kwargs["seed"] = request.seed
        try:
            completion = await self.client.chat.completions.create(**kwargs)
            choice = completion.choices[0]
            text = choice.message.content or ""
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        reason = FINISH.get(choice.finish_reason or "stop", choice.finish_reason or "end_turn")
        if reason == "end_turn" and not text.strip():
            reason = "empty"
        usage = Usage()
        if completion.usage:
            details = getattr(completion.usage, "prompt_tokens_details", None)
            cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
            usage = Usage(completion.usage.prompt_tokens - cached, completion.usage.completion_tokens, cached, 0)
        return Response(text=text, stop_reason=reason, usage=usage, latency_s=time.monotonic() - started,
                        backend=self.name, model=model)

    async def score(self, items: list[ScoreItem], model: str) -> list[list[Score]]:
        """Log-probs through /v1/completions with echo, one prompt per (context, continuation)."""
        prompts, spans = [], []
        for item in items:
            for cont in item.continuations:
                prompts.append(item.context + cont)
                spans.append(len(item.context))
        try:
            completion = await self.client.completions.create(model=model, prompt=prompts, max_tokens=1, echo=True,
                                                              logprobs=0, temperature=0.0)
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        by_index = sorted(completion.choices, key=lambda c: c.index)
        flat = []
        for prompt, choice, start in zip(prompts, by_index, spans):
            lp = choice.logprobs
            # echo returns the prompt's tokens; a generated token, if any, starts past the prompt
            picked = [(tok, p) for tok, p, off in zip(lp.tokens, lp.token_logprobs, lp.text_offset)
                      if start <= off < len(prompt) and p is not None]
            flat.append(Score(sum(p for _, p in picked), [p for _, p in picked], [t for t, _ in picked]))
        out, k = [], 0
        for item in items:
            out.append(flat[k:k + len(item.continuations)])
            k += len(item.continuations)
        return out

    async def ping(self, model: str) -> str:
        try:
            models = await self.client.models.list()
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        return ", ".join(m.id for m in models.data)

    async def aclose(self) -> None:
        await self.client.close()
