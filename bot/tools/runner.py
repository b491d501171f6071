"""The ToolRunner the Assistant calls once per turn: slash commands, routing, native tool calls.

``ToolRunner.run(messages, options, cancel)`` is a generator: it yields ``ToolStarted`` /
``ToolFinished`` events as tools run, and returns (``StopIteration.value``) a ``ToolOutcome``:

* ``messages``: the conversation the model should answer. Search results go into the system
  message as numbered, quoted passages marked as data (router path; see ``search.with_sources``),
  or are appended as fenced ``tool`` messages after the model's own tool calls (native path).
* ``sources``: passages for citations (n, title, source, page, text, start, end, score, doc_id).
* ``tool_calls``: one record per call for the store (name, arguments, ok, summary, timing, via).
* ``direct_reply``: set when a tool's result is the whole answer (``/translate``, ``/sentiment``,
  ``/help``, a usage hint, an automatic translation or sentiment); the model is not called.
* ``tools``: the tool schemas the final answer should be rendered with (native path only).

Order of decisions for the last user message:
1. a slash command (``/search``, ``/translate``, ``/sentiment``, ``/help``) -> that tool;
2. models whose chat template takes ``tools`` -> native tool calling, bounded by the budget;
3. otherwise the intent router -> translate / sentiment / search / nothing;
4. ``options.always_search`` searches the documents when nothing else took the message.

Budget: at most ``max_calls`` tool calls and ``max_turn_s`` seconds per turn (model rounds of the
native loop included); each call also has its own timeout. A failing tool never raises out of
here: the user sees a one-line error and the model is told what failed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from bot.errors import ConfigError
from bot.events import Done, Event, TextDelta, ToolFinished, ToolStarted
from bot.router import TOOLS, Command, IntentRouter, Route, default_examples, help_text, parse_command
from bot.tools.builtin import make_search_tool, make_sentiment_tool, make_translate_tool
from bot.tool_names import SEARCH, SENTIMENT, TRANSLATE
from bot.tools.native import looks_like_tool_call, parse_tool_calls, supports_native_tools
from bot.tools.registry import ToolError, ToolRegistry, ToolResult
from bot.tools.safety import sanitize_markdown
from bot.tools.search import DocumentSearch, with_sources
from bot.tools.sentiment import SentimentAnalyzer, make_backend
from bot.tools.translate import ChatModelBackend, Translator, build_seq2seq_backends
from bot.tools.turn import TurnContext

log = logging.getLogger(__name__)


@dataclass
class ToolSettings:
    """Limits and switches of the tool runner."""

    max_calls: int = 4
    """Most tool calls in one turn (N)."""
    max_turn_s: float = 60.0
    """Most seconds spent on tools in one turn, native model rounds included (T)."""
    search_k: int = 4
    """Passages a search returns by default."""
    max_passage_chars: int = 1200
    """Longest passage put into a prompt; with search_k it sets how much a search lengthens the prompt
    (on a CPU, prefilling those tokens is most of the time a search adds to the first token)."""
    auto_route: bool = True
    """Route plain messages to tools automatically (router or native tool calling)."""
    native: str = "auto"
    """Native tool calling: "auto" (when the chat template takes tools) or "off" (always the router)."""
    max_call_tokens: int = 512
    """Token limit of a native model round that writes tool calls."""
    max_rounds: int = 4
    """Most model rounds of the native loop (each may call several tools)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_calls", "search_k", "max_passage_chars", "max_call_tokens", "max_rounds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be a whole number >= 1")
        if not self.max_turn_s > 0:
            problems.append(f"max_turn_s={self.max_turn_s!r} must be > 0")
        if self.native not in ("auto", "off"):
            problems.append(f"native={self.native!r}: use auto or off")
        if problems:
            raise ConfigError("invalid tool settings: " + "; ".join(problems))


@dataclass
class ToolOutcome:
    """What one turn's tools produced (see the module docstring)."""

    messages: list[dict[str, Any]]
    sources: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    direct_reply: str | None = None
    tools: list[dict[str, Any]] | None = None
    route: dict[str, Any] | None = None


class _Budget:
    """One turn's limits, and its TurnContext (handed to every tool call explicitly)."""

    def __init__(self, settings: ToolSettings, turn: TurnContext):
        self.turn = turn
        self.calls_left = settings.max_calls
        self.deadline = time.perf_counter() + settings.max_turn_s
        self.settings = settings

    def remaining_s(self) -> float:
        return self.deadline - time.perf_counter()

    def exhausted(self) -> str | None:
        if self.calls_left <= 0:
            return f"the tool budget of this turn is used up ({self.settings.max_calls} calls)"
        if self.remaining_s() <= 0:
            return f"the tool time of this turn is used up ({self.settings.max_turn_s:.0f} s)"
        return None


class ToolRunner:
    """Runs the tools of one turn; one instance serves every conversation (thread-safe)."""

    def __init__(self, registry: ToolRegistry, router: IntentRouter | None = None, *, engine=None,
                 settings: ToolSettings | None = None, search: DocumentSearch | None = None):
        self.registry = registry
        self.router = router
        self.engine = engine
        self.settings = settings or ToolSettings()
        self.search = search
        tokenizer = getattr(engine, "tokenizer", None)
        self.native = (self.settings.native == "auto" and tokenizer is not None and supports_native_tools(tokenizer))

    # -- public ----------------------------------------------------------------------------------
    def allowed(self, options) -> list[str]:
        names = self.registry.names()
        if options.tools is None:
            return names
        return [n for n in names if n in set(options.tools)]

    def warm(self) -> None:
        """Load the router's embedder now (call in a background thread at start-up)."""
        if self.router is not None and not self.native:
            self.router.warm()

    def run(self, messages: list[dict[str, Any]], options, cancel: threading.Event) -> Iterator[Event]:
        budget = _Budget(self.settings, TurnContext(collections=tuple(options.collections), cancel=cancel,
                                                    owner=options.owner))
        outcome = ToolOutcome(messages=list(messages))
        if not messages or messages[-1].get("role") != "user":
            return outcome  # e.g. an API client sent tool results itself: nothing to route
        text = str(messages[-1].get("content") or "")
        allowed = self.allowed(options)
        command = parse_command(text)
        if command is not None:
            yield from self._command(command, outcome, options, allowed, budget)
            return outcome
        if not self.settings.auto_route:
            if options.always_search:
                yield from self._search_into_prompt(text, outcome, options, allowed, budget, via="always_search")
            return outcome
        if self.native:
            if options.always_search:
                yield from self._search_into_prompt(text, outcome, options, allowed, budget, via="always_search")
            yield from self._native_loop(outcome, options, allowed, budget, cancel)
            return outcome
        yield from self._routed(text, outcome, options, allowed, budget)
        return outcome

    # -- slash commands ----------------------------------------------------------------------------
    def _command(self, command: Command, outcome: ToolOutcome, options, allowed: list[str], budget: _Budget):
        if command.error:
            outcome.direct_reply = command.error
            return
        if command.name == "help":
            outcome.direct_reply = help_text(allowed)
            return
        if command.name not in allowed:
            outcome.direct_reply = f"/{command.name} is turned off in this conversation."
            return
        if command.name == "search":
            query = command.arguments["query"]
            if not self._search_ready(options):
                outcome.direct_reply = (f"There are no documents in {_names(options.collections)} yet: add some "
                                        f"in the Documents tab, over the API, or with `parley index add PATH`.")
                return
            result = yield from self._call("search", {"query": query, "k": self.settings.search_k}, outcome,
                                           budget, via="slash")
            if result is None:
                outcome.direct_reply = f"Search failed: {outcome.tool_calls[-1]['error']}"
            elif not result.sources:
                outcome.direct_reply = f"Nothing in your documents matches {query!r}."
            else:
                outcome.sources = result.sources
                outcome.messages[-1] = {**outcome.messages[-1], "content": query}  # the question, sans "/search"
                outcome.messages = with_sources(outcome.messages, result.sources)
            return
        args = dict(command.arguments)
        if command.name == "translate" and "target" not in args:
            args["target"] = "English"
        result = yield from self._call(command.name, args, outcome, budget, via="slash")
        if result is None:
            outcome.direct_reply = f"Sorry, {command.name} failed: {outcome.tool_calls[-1]['error']}"
            return
        if command.name == "translate" and result.data.get("source_code") == result.data.get("target_code") \
                and "target" not in command.arguments:
            outcome.direct_reply = "That is already English. Say which language: /translate to French TEXT"
            return
        outcome.direct_reply = sanitize_markdown(result.text)

    # -- router path -------------------------------------------------------------------------------
    def _search_ready(self, options) -> bool:
        return self.search is not None and self.search.available(options.collections, owner=options.owner)

    def _routed(self, text: str, outcome: ToolOutcome, options, allowed: list[str], budget: _Budget):
        route: Route | None = None
        if self.router is not None:
            search_ok = "search" in allowed and self._search_ready(options)
            previous = next((m.get("content") for m in reversed(outcome.messages[:-1])
                             if m.get("role") in ("assistant", "user") and m.get("content")), None)
            route = self.router.route(text, allowed=[t for t in allowed if t in TOOLS], search_available=search_ok,
                                      previous=previous)
            outcome.route = {"tool": route.tool, "confidence": round(route.confidence, 4), "reason": route.reason,
                             "arguments": route.arguments}
        if route is not None and route.tool in ("translate", "sentiment"):
            result = yield from self._call(route.tool, route.arguments, outcome, budget, via="router")
            if result is not None:
                outcome.direct_reply = sanitize_markdown(result.text)
                return
            # The tool failed: let the model answer, knowing that it failed.
            note = f"(The {route.tool} tool failed: {outcome.tool_calls[-1]['error']})"
            outcome.messages[-1] = {**outcome.messages[-1], "content": f"{text}\n\n{note}"}
            return
        vector = self._reusable_vector(route, text, options)
        if route is not None and route.tool == "search":
            vector = vector if route.arguments.get("query") == text else None
            yield from self._search_into_prompt(route.arguments["query"], outcome, options, allowed, budget,
                                                via="router", vector=vector)
        elif options.always_search:
            yield from self._search_into_prompt(text, outcome, options, allowed, budget, via="always_search",
                                                vector=vector)

    def _reusable_vector(self, route: Route | None, text: str, options):
        """The router's embedding of the message, when the index was built with the same embedder."""
        if route is None or route.query_vector is None or self.search is None or self.router is None:
            return None
        try:
            same = self.search.embedder_name(options.collections, owner=options.owner) == getattr(self.router.embedder, "name", None)
        except Exception:
            return None
        return route.query_vector if same else None

    def _search_into_prompt(self, query: str, outcome: ToolOutcome, options, allowed: list[str], budget: _Budget, *,
                            via: str, vector=None):
        if "search" not in allowed or not self._search_ready(options):
            return
        ctx = budget.turn
        ctx.query_vector, ctx.query_for_vector = vector, (query if vector is not None else None)
        result = yield from self._call("search", {"query": query, "k": self.settings.search_k}, outcome, budget,
                                       via=via)
        if result is None:
            question = str(outcome.messages[-1].get("content"))
            note = f"(Searching the documents failed: {outcome.tool_calls[-1]['error']})"
            outcome.messages[-1] = {**outcome.messages[-1], "content": f"{question}\n\n{note}"}
        elif result.sources:
            outcome.sources = result.sources
            outcome.messages = with_sources(outcome.messages, result.sources)

    # -- one call ------------------------------------------------------------------------------------
    def _call(self, name: str, arguments: Any, outcome: ToolOutcome, budget: _Budget, *, via: str,
              call_id: str | None = None, allowed: Iterable[str] | None = None):
        """Run one tool call with events and a store record; returns the ToolResult or None on failure."""
        call_id = call_id or "call_" + uuid.uuid4().hex[:12]
        shown_args = arguments if isinstance(arguments, dict) else {"raw": str(arguments)[:200]}
        started = time.perf_counter()
        record: dict[str, Any] = {"id": call_id, "name": name, "arguments": shown_args, "via": via}
        yield ToolStarted(call_id=call_id, name=str(name)[:64], arguments=shown_args)
        result: ToolResult | None = None
        error = budget.exhausted()
        if error is None:
            budget.calls_left -= 1
            tool = self.registry[name] if isinstance(name, str) and name in self.registry else None
            limit = min(budget.remaining_s(), tool.timeout_s if tool else budget.remaining_s())
            budget.turn.deadline = time.perf_counter() + limit
            try:
                result = self.registry.call(name, arguments, allowed=allowed, timeout_s=limit, turn=budget.turn)
            except ToolError as exc:
                error = str(exc)
            except Exception as exc:  # registry.call only raises ToolError; this is belt and braces
                log.exception("tool %s failed", name)
                error = f"{name} failed ({type(exc).__name__}); see the server log"
        record.update(ok=result is not None, duration_s=round(time.perf_counter() - started, 4))
        if result is None:
            record.update(error=error, summary=error)
            yield ToolFinished(call_id=call_id, name=str(name)[:64], ok=False, summary=error, data={"error": error})
        else:
            record.update(summary=result.summary)
            if result.sources:
                # Whole passages (already neutralized and capped): the UI shows what the model was
                # given when it re-renders a stored conversation, and feedback keeps the context.
                record["sources"] = [dict(s) for s in result.sources]
            yield ToolFinished(call_id=call_id, name=name, ok=True, summary=result.summary, data=result.data)
        outcome.tool_calls.append(record)
        return result

    # -- native tool calling ---------------------------------------------------------------------------
    def _native_loop(self, outcome: ToolOutcome, options, allowed: list[str], budget: _Budget,
                     cancel: threading.Event):
        # Offer search only when there is something to search (a custom search tool without a
        # DocumentSearch is always offered).
        offered = [t for t in allowed if t != "search" or self.search is None or self._search_ready(options)]
        if not offered:
            return
        schemas = self.registry.schemas(offered)
        convo = outcome.messages
        untrusted = bool(outcome.sources)
        for _round in range(self.settings.max_rounds):
            if cancel.is_set() or budget.remaining_s() <= 0 or budget.calls_left <= 0:
                break
            text = self._tool_round(convo, options, schemas, cancel, budget)
            if text is None:
                break  # the model answers in prose: the Assistant streams that answer
            calls, content = parse_tool_calls(text)
            if not calls:
                break
            # After untrusted text (documents) entered the context, only search may be called:
            # a passage must not be able to trigger other tools ("complete mediation").
            permitted = ["search"] if untrusted else offered
            permitted = [t for t in permitted if t in offered]
            convo.append({"role": "assistant", "content": content, "tool_calls": [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name or "invalid", "arguments": c.arguments if isinstance(c.arguments, dict)
                              else {}}} for c in calls]})
            for call in calls:
                if call.error is not None:
                    result, error = None, call.error
                    yield ToolStarted(call_id=call.id, name="invalid", arguments={})
                    yield ToolFinished(call_id=call.id, name="invalid", ok=False, summary=error, data={"error": error})
                    outcome.tool_calls.append({"id": call.id, "name": None, "arguments": {}, "via": "native",
                                               "ok": False, "error": error, "summary": error})
                else:
                    result = yield from self._call(call.name, call.arguments, outcome, budget, via="native",
                                                   call_id=call.id, allowed=permitted)
                    error = None if result is not None else outcome.tool_calls[-1]["error"]
                if result is None:
                    content_out = f"error: {error}"
                else:
                    content_out = result.text
                    if result.sources:
                        # Number passages across the turn so [n] stays unique.
                        base = len(outcome.sources)
                        renumbered = [{**s, "n": base + i} for i, s in enumerate(result.sources, start=1)]
                        outcome.sources.extend(renumbered)
                        from bot.tools.search import sources_block

                        content_out = sources_block(renumbered)
                        untrusted = True
                convo.append({"role": "tool", "tool_call_id": call.id, "name": call.name or "invalid",
                              "content": content_out})
            if budget.exhausted():
                convo.append({"role": "tool", "name": "budget", "tool_call_id": calls[-1].id,
                              "content": f"error: {budget.exhausted()}; answer now with what you have."})
                break
        outcome.tools = schemas

    def _tool_round(self, convo, options, schemas, cancel: threading.Event, budget: _Budget) -> str | None:
        """Generate until it is clear whether the model writes a tool call; None when it answers in prose."""
        params = replace(options.params, max_new_tokens=min(options.params.max_new_tokens, self.settings.max_call_tokens))
        sub = threading.Event()  # closing the stream sets it; the turn's own flag stays untouched
        stream = self.engine.stream(convo, params, adapter=options.adapter, cancel=sub, tools=schemas)
        text = ""
        try:
            for event in stream:
                if cancel.is_set() or budget.remaining_s() <= 0:
                    sub.set()
                    return None
                if isinstance(event, TextDelta):
                    text += event.text
                    if looks_like_tool_call(text) is False:
                        return None
                elif isinstance(event, Done):
                    break
        finally:
            stream.close()
        return text if looks_like_tool_call(text) else None


def _names(collections) -> str:
    return ", ".join(repr(c) for c in collections) or "no collection"


def build_tool_runner(engine, home: Path, *, sentiment_model: str | None = None,
                      translation_models: dict[str, str] | None = None, settings: ToolSettings | None = None,
                      router: IntentRouter | None = None, documents=None) -> ToolRunner:
    """The standard runner: search (indexes under ``home/indexes``), translate, sentiment, and routing.

    sentiment_model: None/"vader" for VADER, else a classifier folder or text-classification model id.
    translation_models: ``{"en-fr": model, "*": multilingual model}``; the chat model translates
        whatever they do not cover.
    Models load on first use; call ``runner.warm()`` in a thread at start-up to load the router early.
    """
    settings = settings or ToolSettings()
    tokenizer = getattr(engine, "tokenizer", None)
    special = []
    if tokenizer is not None:
        special = list(getattr(tokenizer, "all_special_tokens", []) or [])
        special += [str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()]
    search = DocumentSearch(Path(home), k=settings.search_k, max_passage_chars=settings.max_passage_chars,
                            special_tokens=special, library=documents)
    translator = Translator(build_seq2seq_backends(translation_models),
                            ChatModelBackend(engine) if engine is not None else None)
    analyzer = SentimentAnalyzer(make_backend(sentiment_model))
    registry = ToolRegistry()
    registry.register(make_search_tool(search), name=SEARCH, timeout_s=20.0, max_argument_chars=2000)
    registry.register(make_translate_tool(translator), name=TRANSLATE, timeout_s=120.0, max_argument_chars=24000)
    registry.register(make_sentiment_tool(analyzer), name=SENTIMENT, timeout_s=30.0, max_argument_chars=24000)
    if router is None:
        router = IntentRouter(default_examples())
    return ToolRunner(registry, router, engine=engine, settings=settings, search=search)
