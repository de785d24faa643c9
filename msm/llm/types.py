"""Requests and responses, and the canonical request key the call cache is keyed by."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

PURPOSES = ("generate", "revise", "judge", "brainstorm", "eval", "demo", "ping", "other")


@dataclass(frozen=True)
class Message:
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Request:
    messages: tuple[Message, ...]
    model: str | None = None  # None: the backend's default model
    system: str | None = None  # the part of the system prompt that changes per request
    system_prefix: str | None = None  # the shared, cacheable part (the spec), sent first
    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None  # also the sample index: two samples of one prompt differ by seed
    purpose: str = "other"

    def __post_init__(self):
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if not self.messages:
            raise ValueError("a request needs at least one message")
        if self.purpose not in PURPOSES:
            raise ValueError(f"unknown purpose '{self.purpose}': use one of {', '.join(PURPOSES)}")

    @staticmethod
    def user(text: str, **kw) -> "Request":
        return Request(messages=(Message("user", text),), **kw)

    def key(self, backend: str, model: str) -> str:
        """sha256 of everything that changes the answer; the purpose tag does not."""
        body = asdict(self)
        body.pop("purpose")
        body["backend"] = backend
        body["model"] = model
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass
class Response:
    text: str
    stop_reason: str  # end_turn, max_tokens, stop_sequence, refusal, error, ...
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    latency_s: float = 0.0
    backend: str = ""
    model: str = ""
    key: str = ""
    cached: bool = False
    error: str | None = None  # set when the call failed for good; never served from cache as an answer
    batch: bool = False

    @property
    def truncated(self) -> bool:
        return self.stop_reason == "max_tokens"

    @property
    def refused(self) -> bool:
        return self.stop_reason == "refusal"

    @property
    def ok(self) -> bool:
        return self.error is None
