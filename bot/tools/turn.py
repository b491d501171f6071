"""The facts of one turn that tools read in code: which index, the cancel flag, the deadline.

The runner holds one ``TurnContext`` per turn and passes it explicitly to every tool call; the
registry runs the tool in a fresh ``contextvars.Context`` where ``current_turn()`` returns it.
Why not set a ContextVar in the runner: the runner is a generator, and the API
(``asyncio.to_thread(next, ...)``) and Gradio resume generators in whatever worker thread is free.
A ContextVar set before a ``yield`` is then missing after it (the tool would search the wrong
index, with a cancel flag nobody sets) and resetting its token raises ``ValueError: ... was
created in a different Context``. A context built per call has neither problem.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class TurnContext:
    """Per-turn facts set by the runner in code, never by the model's arguments."""

    collections: tuple[str, ...] = ("default",)
    cancel: threading.Event = field(default_factory=threading.Event)
    query_vector: Any = None
    query_for_vector: str | None = None
    deadline: float | None = None
    """time.perf_counter() value after which the current call should stop (its timeout)."""
    owner: str | None = None
    """Whose documents the turn may search (None: the deployment's shared indexes)."""


_TURN: contextvars.ContextVar[TurnContext] = contextvars.ContextVar("parley_turn")


def current_turn() -> TurnContext:
    """The turn the running tool call belongs to (a default one outside a call)."""
    return _TURN.get(TurnContext())


def bound_to(turn: TurnContext | None, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped to run in a new context where ``current_turn()`` is ``turn``.

    Safe to call from any thread: nothing is set in the caller's context.
    """
    def run(*args, **kwargs):
        ctx = contextvars.copy_context()
        if turn is not None:
            ctx.run(_TURN.set, turn)
        return ctx.run(fn, *args, **kwargs)

    return run
