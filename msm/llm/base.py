"""The backend contract, and the errors that tell the client whether to retry."""

from __future__ import annotations

from dataclasses import dataclass

from msm.errors import MsmError
from msm.llm.types import Request, Response


class TransientError(Exception):
    """Worth retrying: rate limits, overload, 5xx, timeouts, resets, garbled replies."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(MsmError):
    """Retrying cannot help: bad request, bad key, unknown model."""


@dataclass
class ScoreItem:
    context: str
    continuations: tuple[str, ...]


@dataclass
class Score:
    """Log-probabilities of one continuation given its context, or why the server could not give them.

    An errored score (the option's token is not among the server's top log-probs, say) has `error`
    set and a NaN total, so that arithmetic on it can never pass for a real probability.
    """

    total: float
    per_token: list[float]
    tokens: list[str]
    error: str | None = None

    @staticmethod
    def failed(reason: str) -> "Score":
        return Score(float("nan"), [], [], reason)

    @property
    def ok(self) -> bool:
        return self.error is None


RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}


def scrub(text: str, secret: str | None) -> str:
    """Keys never reach logs, errors or the warehouse."""
    return text.replace(secret, "***") if secret else text


def classify_sdk_error(exc: Exception, sdk, secret: str | None, who: str, key_env: str) -> Exception:
    """Map an anthropic/openai SDK exception (the two share their error classes' shape) to retry or fail."""
    import json

    message = scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, secret)
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        if status in RETRYABLE_STATUS or status >= 500:
            retry_after = exc.response.headers.get("retry-after") if exc.response is not None else None
            try:
                wait = float(retry_after) if retry_after else None
            except ValueError:
                wait = None
            return TransientError(f"HTTP {status}: {message}", retry_after=wait)
        if status in (401, 403):
            return FatalError(f"{who} refused the key (HTTP {status})", f"check {key_env}")
        if status == 404:
            return FatalError(f"{who} does not know this model or route (HTTP 404): {message}", "check --model")
        return FatalError(f"{who} rejected the request (HTTP {status}): {message}", "check --model and the request")
    if isinstance(exc, (sdk.APITimeoutError, sdk.APIConnectionError)):
        return TransientError(f"{type(exc).__name__}: {message}")
    if isinstance(exc, (sdk.APIResponseValidationError, json.JSONDecodeError)):
        return TransientError(f"malformed response: {message}")
    if isinstance(exc, sdk.APIError):  # an error event in the middle of a stream: the server broke off
        return TransientError(f"the server broke off the answer: {message}")
    return exc


class Backend:
    """One provider. `call` does one attempt; retries, caching and budgets live in the client."""

    name = "base"
    default_model = ""
    supports_batch = False
    score_chunk = 64  # score items per `score` call: what one call to the backend can take at once
    score_version: int | None = None  # set when a backend's scoring method changes what a score means

    async def call(self, request: Request, model: str) -> Response:
        raise NotImplementedError

    async def score(self, items: list[ScoreItem], model: str) -> list[list[Score]]:
        raise FatalError(f"the {self.name} backend cannot score log-probabilities",
                         "use the local backend or an OpenAI-compatible server such as vLLM")

    async def ping(self, model: str) -> str:
        response = await self.call(Request.user("Reply with the word: pong", max_tokens=8, temperature=0.0,
                                                purpose="ping"), model)
        return response.text

    async def aclose(self) -> None:
        pass
