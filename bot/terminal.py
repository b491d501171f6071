"""`parley chat`: a streaming terminal chat, or one reply with --message."""

from __future__ import annotations

import sys
import threading
from dataclasses import replace

from bot.assistant import TurnOptions
from bot.config import Settings
from bot.engine import BASE, GenerationParams
from bot.errors import ParleyError, RequestError
from bot.events import Done, TextDelta, ToolFinished, ToolStarted

HELP = "commands: /reset  /system TEXT  /adapter NAME  /adapters  /quit   (Ctrl-C stops a reply)"


def _print_sources(sources, out) -> None:
    if not sources:
        return
    try:
        from bot.tools import format_sources  # type: ignore[attr-defined]
        print(format_sources(list(sources)), file=out)
        return
    except ImportError:
        pass
    for s in sources:
        page = f", page {s['page']}" if s.get("page") else ""
        print(f"  [{s.get('n', '?')}] {s.get('title') or s.get('source')}{page}", file=out)


def _turn(runtime, history, options, out=sys.stdout, err=sys.stderr) -> tuple[str, Done | None]:
    cancel = threading.Event()
    parts: list[str] = []
    done: Done | None = None
    events = runtime.assistant.respond(history, options, cancel=cancel)
    try:
        for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
                out.write(event.text)
                out.flush()
            elif isinstance(event, ToolStarted):
                print(f"· {event.name}({', '.join(f'{k}={v!r}' for k, v in event.arguments.items())})", file=err)
            elif isinstance(event, ToolFinished):
                print(f"· {event.name}: {event.summary}", file=err)
            elif isinstance(event, Done):
                done = event
    except KeyboardInterrupt:
        cancel.set()  # the engine stops within one decoding step
        events.close()
        done = Done(finish_reason="cancelled")
    out.write("\n")
    if done is not None:
        _print_sources(done.sources, out)
    return "".join(parts), done


def run_chat(settings: Settings, *, message: str | None = None, adapter: str = BASE,
             temperature: float | None = None, seed: int | None = None) -> int:
    from bot.runtime import build_runtime

    piped = message == "-" or (message is None and not sys.stdin.isatty())
    if piped:
        message = sys.stdin.read()
    if message is not None and not message.strip():
        raise RequestError("the message is empty: pass text with --message or pipe it on stdin")
    runtime = build_runtime(settings, progress=message is None or sys.stderr.isatty())
    params = GenerationParams(max_new_tokens=settings.max_new_tokens)
    if temperature is not None:
        params = replace(params, temperature=temperature)
    if seed is not None:
        params = replace(params, seed=seed)
    runtime.engine.require_adapter(adapter)
    conversation = runtime.store.create_conversation(source="cli")
    options = TurnOptions(params=params, adapter=adapter, conversation_id=conversation, source="cli")

    if message is not None:
        reply, done = _turn(runtime, [{"role": "user", "content": message}], options)
        if done is None or done.finish_reason in ("error", "cancelled"):
            print(f"error: {done.error if done else 'no reply'}", file=sys.stderr)
            return 1
        return 0

    history: list[dict] = []
    system: str | None = None
    print(f"Parley chat on {settings.model}. {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(f"{options.adapter}> ")
        except (EOFError, KeyboardInterrupt):
            print("", file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history, options.conversation_id = [], runtime.store.create_conversation(source="cli")
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            options.system_prompt = system
            print(f"(system prompt {'set' if system else 'reset to default'})", file=sys.stderr)
            continue
        if text == "/adapters":
            print("adapters: " + ", ".join([BASE, *runtime.engine.adapters]), file=sys.stderr)
            continue
        if text.startswith("/adapter"):
            name = text[len("/adapter"):].strip() or BASE
            try:
                runtime.engine.require_adapter(name)
            except ParleyError as exc:
                print(f"error: {exc}", file=sys.stderr)
                continue
            options.adapter = name
            continue
        history.append({"role": "user", "content": line})
        try:
            reply, done = _turn(runtime, history, options)
        except ParleyError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        if done is not None and done.error:
            print(f"error: {done.error}", file=sys.stderr)
        history.append({"role": "assistant", "content": reply})
