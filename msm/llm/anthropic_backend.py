"""Claude through the official SDK: streaming Messages, prompt caching, and the Message Batches API."""

from __future__ import annotations

import os
import time

from msm.llm.base import Backend, FatalError, classify_sdk_error
from msm.llm.types import Request, Response, Usage

DEFAULT_MODEL = "claude-sonnet-4-6"
class AnthropicBackend(Backend):
    name = "anthropic"
    default_model = DEFAULT_MODEL
    supports_batch = True

    def __init__(self, api_key: str | None = None, base_url: str | None = None, idle_timeout: float = 120.0,
                 connect_timeout: float = 10.0, stream: bool = True, time_scale: float = 1.0):
        self.api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        if not self.api_key:
            raise FatalError("the anthropic backend needs an API key",
                             "export ANTHROPIC_API_KEY=..., or choose --backend local")
        import anthropic
        import httpx2

        self._sdk = anthropic
        # The read timeout is an idle timeout: it fires when no bytes arrive for that long,
        # so a long generation that keeps streaming is never cut, and a hung one is.
        # `time_scale` (benchmarks only) divides both timeouts, as RetryPolicy.time_scale divides its delays.
        timeout = httpx2.Timeout(idle_timeout / time_scale, connect=connect_timeout / time_scale)
        self.client = anthropic.AsyncAnthropic(api_key=self.api_key, base_url=base_url, max_retries=0, timeout=timeout)
        self.stream = stream

    # ---- requests ----------------------------------------------------------------------
    def params(self, request: Request, model: str) -> dict:
        params: dict = {
            "model": model,
            "max_tokens": request.max_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        # The current Messages API and SDK (2.x) take no sampling parameters: temperature and
        # top_p stay in the request key (they name the sample) but are not sent.
        if request.system_prefix:
            blocks = [{"type": "text", "text": request.system_prefix, "cache_control": {"type": "ephemeral"}}]
            if request.system:
                blocks.append({"type": "text", "text": request.system})
            params["system"] = blocks
        elif request.system:
            params["system"] = request.system
        if request.stop:
            params["stop_sequences"] = list(request.stop)
        return params

    def to_response(self, message, model: str, started: float, batch: bool = False) -> Response:
        text = "".join(getattr(block, "text", "") for block in message.content if block.type == "text")
        reason = message.stop_reason or "end_turn"
        if reason == "end_turn" and not text.strip():
            reason = "empty"
        u = message.usage
        usage = Usage(u.input_tokens or 0, u.output_tokens or 0, getattr(u, "cache_read_input_tokens", 0) or 0,
                      getattr(u, "cache_creation_input_tokens", 0) or 0)
        return Response(text=text, stop_reason=reason, usage=usage, latency_s=time.monotonic() - started,
                        backend=self.name, model=model, batch=batch)

    def classify(self, exc: Exception) -> Exception:
        return classify_sdk_error(exc, self._sdk, self.api_key, "the Anthropic API", "ANTHROPIC_API_KEY")

    async def call(self, request: Request, model: str) -> Response:
        started = time.monotonic()
        params = self.params(request, model)
        try:
            if self.stream:
                async with self.client.messages.stream(**params) as stream:
                    message = await stream.get_final_message()
            else:
                message = await self.client.messages.create(**params)
        except Exception as exc:  # noqa: BLE001 - classified into retry or fail
            raise self.classify(exc) from None
        return self.to_response(message, model, started)

    # ---- Message Batches ------------------------------------------------------------------
    async def submit_batch(self, items: list[tuple[str, Request]], model: str) -> str:
        try:
            batch = await self.client.messages.batches.create(
                requests=[{"custom_id": cid, "params": self.params(req, model)} for cid, req in items])
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        return batch.id

    async def batch_ended(self, batch_id: str) -> bool:
        try:
            batch = await self.client.messages.batches.retrieve(batch_id)
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        return batch.processing_status == "ended"

    async def batch_results(self, batch_id: str, model: str) -> dict[str, Response | str]:
        """custom_id -> Response, or the reason the item failed (errored, expired, canceled)."""
        started = time.monotonic()
        out: dict[str, Response | str] = {}
        try:
            async for entry in await self.client.messages.batches.results(batch_id):
                result = entry.result
                if result.type == "succeeded":
                    out[entry.custom_id] = self.to_response(result.message, model, started, batch=True)
                elif result.type == "errored":
                    out[entry.custom_id] = f"errored: {getattr(getattr(result.error, 'error', None), 'message', '')}"
                else:
                    out[entry.custom_id] = result.type
        except Exception as exc:  # noqa: BLE001
            raise self.classify(exc) from None
        return out

    async def aclose(self) -> None:
        await self.client.close()
