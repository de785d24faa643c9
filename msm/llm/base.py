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
    """Log-probabilities of one continuation given its context."""

    total: float
    per_token: list[float]
    tokens: list[str]


class Backend:
    """One provider. `call` does one attempt; retries, caching and budgets live in the client."""

    name = "base"
    default_model = ""
    supports_batch = False

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
