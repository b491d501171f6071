"""One chat turn: route -> run tools -> build context -> stream reply -> store -> events.

``Assistant.respond`` is what every front end calls (CLI, API, browser, Slack, Discord). It takes
a normalized conversation and ``TurnOptions`` and yields events: tool steps, text deltas, and a
final ``Done`` that carries the stored turn's id (feedback attaches to it) and the sources.

Tools plug in through a ``ToolRunner`` (bot/tools): an object whose
``run(messages, options, cancel)`` is a generator that yields ``ToolStarted``/``ToolFinished``
events and returns a ``ToolOutcome`` with ``messages`` (the conversation the model should
answer, with tool results added as data), ``sources`` (for citations), ``tool_calls`` (records
for the store) and ``direct_reply`` (set when a tool's result is the whole answer, e.g.
``/translate``; the model is then not called).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from bot.chat import Message, normalize_messages, with_system_prompt
from bot.engine import BASE, Engine, GenerationParams
from bot.errors import ParleyError
from bot.events import Done, Event, TextDelta, ToolFinished, ToolStarted, Usage
from bot.store import Store

log = logging.getLogger(__name__)


@dataclass
class TurnOptions:
    """How to answer one turn. Front ends fill it from their controls, flags or channel settings."""

    params: GenerationParams = field(default_factory=GenerationParams)
    adapter: str = BASE
    system_prompt: str | None = None
    """Overrides the default system prompt (a system message in the conversation wins over both)."""
    tools: tuple[str, ...] | None = None
    """Tools allowed this turn; None = every registered tool, () = none."""
    always_search: bool = False
    """Retrieval-augmented answers: search the documents for every message."""
    collections: tuple[str, ...] = ("default",)
    """Which document collections the search tool searches (the owner's own and the shared ones)."""
    owner: str | None = None
    """Who the turn belongs to (see bot/owners.py): its conversation, feedback and documents."""
    conversation_id: str | None = None
    """Store the turn in this conversation (None: do not store)."""
    new_messages: int = 1
    """How many trailing messages are new in this turn (stored with the turn)."""
    source: str = "web"


class ToolRunner(Protocol):
    def run(self, messages: list[Message], options: TurnOptions,
            cancel: threading.Event) -> Iterator[Event]: ...


@dataclass
class ToolOutcomeView:
    """What the assistant reads from a ToolRunner's return value (duck-typed)."""

    messages: list[Message]
    sources: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    direct_reply: str | None = None


class Assistant:
    """Composes the engine, the tools and the store into chat turns."""

    def __init__(self, engine: Engine, *, store: Store | None = None, system_prompt: str = "",
                 tools: ToolRunner | None = None):
        self.engine = engine
        self.store = store
        self.system_prompt = system_prompt
        self.tools = tools

    def respond(self, conversation: list[Any], options: TurnOptions | None = None, *,
                cancel: threading.Event | None = None) -> Iterator[Event]:
        """Stream one turn. Raises RequestError up front for bad input (nothing is stored then).

        The turn is stored when it finishes (also when it was cancelled or failed part-way, with
        that finish reason), before the final ``Done`` is yielded.
        """
        options = options or TurnOptions()
        cancel = cancel or threading.Event()
        messages = normalize_messages(conversation)
        messages = with_system_prompt(messages, options.system_prompt or self.system_prompt)
        # Validate before anything streams so the API can answer 4xx instead of a broken stream:
        # an unknown adapter, or a message that cannot fit the context window even alone.
        self.engine.require_adapter(options.adapter)
        self.engine.prompt_ids(messages, options.params.max_new_tokens)
        return self._turn(messages, options, cancel)

    def _turn(self, messages: list[Message], options: TurnOptions, cancel: threading.Event) -> Iterator[Event]:
        started = time.perf_counter()
        reply_parts: list[str] = []
        outcome = ToolOutcomeView(messages=messages)
        done = Done(finish_reason="error", error="the turn did not finish")
        turn_id = self._begin(messages, options)  # the message is on disk before any work starts
        try:
            if self.tools is not None:
                runner = self.tools.run(messages, options, cancel)
                while True:
                    try:
                        event = next(runner)
                    except StopIteration as stop:
                        if stop.value is not None:
                            outcome = stop.value
                        break
                    yield event
            if outcome.direct_reply is not None:
                reply_parts.append(outcome.direct_reply)
                yield TextDelta(outcome.direct_reply)
                done = Done(finish_reason="stop", usage=Usage(total_time_s=time.perf_counter() - started))
            else:
                # Native tool calling renders the final answer with the same tool schemas it offered.
                for event in self.engine.stream(outcome.messages, options.params, adapter=options.adapter,
                                                cancel=cancel, tools=getattr(outcome, "tools", None) or None):
                    if isinstance(event, Done):
                        done = event
                        break
                    if isinstance(event, TextDelta):
                        reply_parts.append(event.text)
                    yield event
        except ParleyError as exc:
            done = Done(finish_reason="error", error=str(exc), status=exc.status)
        except GeneratorExit:
            cancel.set()
            done = Done(finish_reason="cancelled")
            self._store(turn_id, messages, options, "".join(reply_parts), done, outcome)
            raise
        except Exception as exc:  # never a stack trace to the user; details go to the log
            log.exception("chat turn failed")
            done = Done(finish_reason="error", error=f"something went wrong ({type(exc).__name__}); see the server log",
                        status=500)
        turn_id = self._store(turn_id, messages, options, "".join(reply_parts), done, outcome)
        yield Done(finish_reason=done.finish_reason, usage=done.usage, error=done.error, turn_id=turn_id,
                   sources=tuple(outcome.sources), status=done.status if done.error else 200)

    def _begin(self, messages: list[Message], options: TurnOptions) -> str | None:
        if self.store is None or options.conversation_id is None:
            return None
        new = [m for m in messages[-options.new_messages:] if m["role"] in ("user", "system", "tool")]
        params = {k: getattr(options.params, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens",
                                                          "repetition_penalty", "seed")}
        try:
            return self.store.begin_turn(options.conversation_id, messages=new, model=self.engine.model_name,
                                         adapter=options.adapter, params=params)
        except Exception:
            log.exception("could not store the turn")
            return None

    def _store(self, turn_id: str | None, messages: list[Message], options: TurnOptions, reply: str, done: Done,
               outcome: ToolOutcomeView) -> str | None:
        if turn_id is None:
            return None
        try:
            self.store.finish_turn(turn_id, reply=reply, tool_calls=outcome.tool_calls,
                                   finish_reason=done.finish_reason,
                                   usage={**done.usage.to_dict(), "error": done.error},
                                   prompt=list(outcome.messages))
            return turn_id
        except Exception:
            log.exception("could not store the turn")
            return None


def collect(events: Iterator[Event]) -> dict[str, Any]:
    """Drain a turn: the reply text, tool steps and the final Done (for non-streaming callers)."""
    text: list[str] = []
    steps: list[Event] = []
    done: Done | None = None
    for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, (ToolStarted, ToolFinished)):
            steps.append(event)
        elif isinstance(event, Done):
            done = event
    return {"text": "".join(text), "steps": steps, "done": done}
