"""The events one chat turn streams, shared by every caller (CLI, API, UI, Slack, Discord).

Streaming first: the engine and the assistant yield these; a non-streaming call joins them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Usage:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float | None = None
    total_time_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        decode_time = self.total_time_s - (self.time_to_first_token_s or 0.0)
        if self.completion_tokens <= 1 or decode_time <= 0:
            return 0.0
        # The first token's latency is prefill; the rate is over the tokens after it.
        return (self.completion_tokens - 1) / decode_time

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "time_to_first_token_s": self.time_to_first_token_s,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "total_time_s": round(self.total_time_s, 4),
        }


@dataclass(frozen=True)
class TextDelta:
    """A new piece of the reply (not the whole reply so far)."""

    text: str


@dataclass(frozen=True)
class ToolStarted:
    """The assistant is about to run a tool."""

    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolFinished:
    """A tool returned. ``summary`` is short text for people; ``data`` is structured (sources...)."""

    call_id: str
    name: str
    ok: bool
    summary: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    """The last event of every generation or turn."""

    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    turn_id: str | None = None
    sources: tuple[dict[str, Any], ...] = ()
    status: int = 200
    """For errors: the HTTP status that fits (4xx the client's fault, 503 busy, 500 ours)."""


Event = Union[TextDelta, ToolStarted, ToolFinished, Done]


def join_text(events) -> tuple[str, Done]:
    """Drain an event stream; return the full text and the final ``Done`` event."""
    parts: list[str] = []
    done: Done | None = None
    for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Done):
            done = event
    if done is None:  # a stream must end with Done; treat a truncated one as an error
        done = Done(finish_reason="error", error="the stream ended without a final event")
    return "".join(parts), done
