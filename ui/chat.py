"""The Chat tab: streaming replies, Stop, retry, edit, feedback, settings, server-side history.

The conversation lives in the store (server side) and belongs to whoever is asking (ui/session.py);
the browser only remembers which conversation it had open (``gr.BrowserState``), so history
survives a reload and a server restart. The UI history is always rebuilt from the store, which
keeps UI indexes and stored turns in step. Every read and write passes the owner: a conversation
id that is not yours loads nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from bot.assistant import TurnOptions
from bot.engine import BASE, GenerationParams
from bot.errors import NotFoundError, ParleyError
from bot.events import Done, TextDelta, ToolFinished, ToolStarted
from bot.owners import Identity
from bot.runtime import Runtime
from bot.tool_names import TOOL_NAMES
from bot.tools.safety import sanitize_markdown
from ui.session import Session


def _sources_markdown(reply: str, sources) -> str:
    """The source cards under a reply (ui/citations.py when present: cited first, highlighted)."""
    try:
        from ui.citations import render_sources
    except ImportError:  # pragma: no cover - the plain list below
        render_sources = None
    if render_sources is not None:
        return render_sources(reply, list(sources))
    lines = []
    for s in sources:
        where = s.get("source") or ""
        page = f", p. {s['page']}" if s.get("page") else ""
        quote = " ".join(str(s.get("text", "")).split())[:220]
        lines.append(f"**[{s.get('n', '?')}] {s.get('title') or where}**{page} — `{where}`\n> {quote}")
    return "\n\n".join(lines)


def _reply_markdown(reply: str, sources) -> str:
    """A reply for the screen: outside images and scripts removed, [n] linked to its source card."""
    text = sanitize_markdown(reply)
    if not sources:
        return text
    try:
        from ui.citations import render_reply
    except ImportError:  # pragma: no cover
        return text
    return render_reply(text, list(sources))


def _turn_sources(turn) -> list[dict[str, Any]]:
    """The passages a stored turn was given (the search tool's record keeps them)."""
    out: list[dict[str, Any]] = []
    for call in turn.tool_calls:
        out.extend(s for s in call.get("sources") or [] if "text" in s)
    return out


def render_history(runtime: Runtime, conversation_id: str | None, owner: str) -> tuple[list[dict], list[int]]:
    """Chatbot messages for one of ``owner``'s stored conversations, and the turn seq of each message."""
    if not conversation_id:
        return [], []
    messages: list[dict] = []
    owners: list[int] = []
    for turn in runtime.store.turns(conversation_id, owner):
        for m in turn.messages:
            if m["role"] == "user":
                messages.append({"role": "user", "content": m["content"]})
                owners.append(turn.seq)
        for call in turn.tool_calls:
            messages.append({"role": "assistant", "content": str(call.get("summary", "")),
                             "metadata": {"title": f"🔧 {call.get('name', 'tool')}", "status": "done"}})
            owners.append(turn.seq)
        sources = _turn_sources(turn)
        reply = _reply_markdown(turn.reply, sources)
        if turn.finish_reason == "cancelled":
            reply += " *(stopped)*"
        elif turn.finish_reason == "running":
            reply += " *(still answering…)*"
        elif turn.finish_reason == "interrupted":
            reply += " *(interrupted: the server stopped while answering; retry it)*"
        elif turn.finish_reason == "error":
            reply += f" *(error: {turn.usage.get('error') or 'generation failed'})*"
        messages.append({"role": "assistant", "content": reply})
        owners.append(turn.seq)
        if sources:
            messages.append({"role": "assistant", "content": _sources_markdown(turn.reply, sources),
                             "metadata": {"title": f"📚 Sources ({len(sources)})"}})
            owners.append(turn.seq)
    return messages, owners


def collection_choices(runtime: Runtime, owner: str) -> list[tuple[str, str]]:
    """(label, name) of the collections ``owner`` can search: their own and the shared ones."""
    if runtime.documents is not None:
        return [(f"{c.name}" + (" (shared)" if c.shared else ""), c.name)
                for c in runtime.documents.collections(owner)]
    root = runtime.settings.home / "indexes"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [(f"{n} (shared)", n) for n in names]


@dataclass
class ChatTab:
    """What the app needs from the chat tab."""

    adapter: gr.Dropdown
    run_turn: Any
    """run_turn(identity, user_text, conversation_id, settings) -> stream of (messages, owners, cid)."""
    load: Any
    """The page-load handler: restores the open conversation and fills the pickers."""
    load_inputs: list
    load_outputs: list


def build_chat_tab(runtime: Runtime, session: Session) -> ChatTab:
    """The chat; call inside ``with gr.Tab("Chat"):`` of the app's Blocks."""
    store, engine = runtime.store, runtime.engine

    def adapter_choices() -> list[str]:
        return [BASE, *sorted(engine.adapters)]

    def conversation_choices(owner: str) -> list[tuple[str, str]]:
        return [((c["title"] or "(untitled)")[:60], c["id"]) for c in store.list_conversations(50, owner=owner)]

    def options_from(identity: Identity, system, temperature, top_p, max_tokens, seed, adapter, tools, always_search,
                     collections, conversation_id):
        params = GenerationParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                                  seed=int(seed) if seed not in (None, "", -1) and int(seed) >= 0 else None)
        return TurnOptions(params=engine.clamp(params), adapter=adapter or BASE, system_prompt=(system or None),
                           tools=tuple(tools or ()), always_search=bool(always_search),
                           collections=tuple(collections or ("default",)), conversation_id=conversation_id,
                           owner=identity.owner, source="web")

    def run_turn(identity: Identity, user_text: str, conversation_id: str | None, settings) -> Iterator[tuple]:
        """Stream a turn: yields (chatbot messages, owners, conversation_id)."""
        owner = identity.owner
        if conversation_id:
            try:
                store.get_conversation(conversation_id, owner)
            except NotFoundError:  # not yours (or deleted): start a new one, never touch that one
                conversation_id = None
        if not conversation_id:
            conversation_id = store.create_conversation(owner=owner, source="web")
        history, owners = render_history(runtime, conversation_id, owner)
        prior = store.history(conversation_id, owner)
        options = options_from(identity, *settings, conversation_id)
        shown = [*history, {"role": "user", "content": user_text}]
        cancel = threading.Event()
        try:
            events = runtime.assistant.respond([*prior, {"role": "user", "content": user_text}], options, cancel=cancel)
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        reply = ""
        steps: list[dict] = []
        try:
            for event in events:
                if isinstance(event, ToolStarted):
                    steps.append({"role": "assistant", "content": "…",
                                  "metadata": {"title": f"🔧 {event.name}", "status": "pending"}})
                elif isinstance(event, ToolFinished):
                    if steps:
                        steps[-1] = {"role": "assistant", "content": event.summary,
                                     "metadata": {"title": f"🔧 {event.name}", "status": "done"}}
                elif isinstance(event, TextDelta):
                    reply += event.text
                elif isinstance(event, Done):
                    break
                yield [*shown, *steps, {"role": "assistant", "content": sanitize_markdown(reply)}], owners, \
                    conversation_id
        finally:
            cancel.set()  # Stop / closed tab: gradio closes this generator; the engine stops in a step
            events.close()
        messages, owners = render_history(runtime, conversation_id, owner)
        yield messages, owners, conversation_id

    conversation_state = gr.BrowserState(None, storage_key="parley-conversation")
    owners_state = gr.State([])
    with gr.Sidebar():
        gr.Markdown("### Parley")
        new_chat = gr.Button("New chat", variant="secondary")
        conversations = gr.Radio(label="Your conversations", choices=[], type="value")
    chatbot = gr.Chatbot(label="Parley", height="62vh", editable="user", buttons=["copy"],
                         feedback_options=("Like", "Dislike"), sanitize_html=True, elem_id="parley-chatbot",
                         placeholder="Ask anything. Slash commands: /search, /translate, /sentiment, /help")
    with gr.Row():
        # Off until the page-load event has restored the conversation: a message sent before it
        # finished was overwritten by the load's (older) outputs and vanished.
        textbox = gr.Textbox(placeholder="Message Parley…", show_label=False, scale=8, autofocus=True,
                             elem_id="parley-input", interactive=False)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="parley-send", interactive=False)
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="parley-stop")
    with gr.Accordion("Settings", open=False, elem_id="parley-settings"):
        system = gr.Textbox(label="System prompt", value=runtime.settings.system_prompt, lines=2)
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.2, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top p")
            # The default (--max-new-tokens) may be below 16 or the cap small: the slider takes both.
            cap = runtime.settings.max_new_tokens_cap
            default = min(runtime.settings.max_new_tokens, cap)
            max_tokens = gr.Slider(min(16, default, cap - 1), cap, value=default, step=1,
                                   label="Max new tokens")
            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        with gr.Row():
            adapter = gr.Dropdown(choices=adapter_choices(), value=BASE, label="Adapter", allow_custom_value=False,
                                  elem_id="parley-adapter")
            refresh = gr.Button("Reload adapters", size="sm")
            tools = gr.CheckboxGroup(list(TOOL_NAMES), value=list(TOOL_NAMES), label="Tools allowed")
        with gr.Row():
            always_search = gr.Checkbox(False, label="Always search my documents", elem_id="parley-always-search")
            collections = gr.CheckboxGroup([], value=[], label="Search these collections",
                                           elem_id="parley-collections")
    with gr.Accordion("Mood of the conversation", open=False):
        mood_plot = gr.LinePlot(x="message", y="compound", y_lim=[-1, 1], height=220,
                                label="Sentiment of each of your messages (-1 to 1)")
        mood_refresh = gr.Button("Update", size="sm")
    settings = [system, temperature, top_p, max_tokens, seed, adapter, tools, always_search, collections]
    outputs = [chatbot, owners_state, conversation_state]

    def load(conversation_id, browser_id, selected, request: gr.Request):
        identity = session.identity(request, browser_id)
        if conversation_id:
            try:
                store.get_conversation(conversation_id, identity.owner)
            except ParleyError:
                conversation_id = None
        messages, owners = render_history(runtime, conversation_id, identity.owner)
        choices = collection_choices(runtime, identity.owner)
        names = [name for _, name in choices]
        value = [c for c in (selected or []) if c in names] or [n for n in names if n == "default"] or names[:1]
        return (messages, owners, conversation_id,
                gr.update(choices=conversation_choices(identity.owner), value=conversation_id),
                gr.update(choices=adapter_choices()), gr.update(choices=choices, value=value),
                gr.update(interactive=True), gr.update(interactive=True))

    def submit(request: gr.Request, user_text, conversation_id, browser_id, *settings_values):
        if not user_text or not user_text.strip():
            raise gr.Error("Type a message first.")
        identity, browser_id = session.identity_or_new(request, browser_id)
        for messages, owners, cid in run_turn(identity, user_text, conversation_id, settings_values):
            yield messages, owners, cid, browser_id

    def refresh_list(browser_id, request: gr.Request):
        return gr.update(choices=conversation_choices(session.identity(request, browser_id).owner))

    events = []
    for trigger in (textbox.submit, send.click):
        ev = trigger(submit, [textbox, conversation_state, session.browser_id, *settings],
                     [*outputs, session.browser_id], api_name=False,
                     concurrency_limit=runtime.settings.max_batch_size)
        ev.then(refresh_list, session.browser_id, conversations, api_name=False)
        trigger(lambda: "", None, textbox, api_name=False, queue=False)
        events.append(ev)
    stop.click(None, None, None, cancels=events, api_name=False)

    def replay(data, conversation_id, owners, edited, browser_id, settings_values, request):
        identity = session.identity(request, browser_id)
        index = data.index if isinstance(data.index, int) else data.index[0]
        if not conversation_id or index >= len(owners):
            raise gr.Error("Nothing to retry here.")
        seq = owners[index]
        try:
            turn = next((t for t in store.turns(conversation_id, identity.owner) if t.seq == seq), None)
        except NotFoundError:
            turn = None
        if turn is None:
            raise gr.Error("That message is no longer stored; reload the conversation.")
        user_text = edited if edited is not None else next(
            (m["content"] for m in turn.messages if m["role"] == "user"), "")
        store.truncate_after(conversation_id, seq - 1, identity.owner)  # only ever your own conversation
        yield from run_turn(identity, user_text, conversation_id, settings_values)

    def on_retry(request: gr.Request, data: gr.RetryData, conversation_id, owners, browser_id, *settings_values):
        yield from replay(data, conversation_id, owners, None, browser_id, settings_values, request)

    def on_edit(request: gr.Request, data: gr.EditData, conversation_id, owners, browser_id, *settings_values):
        value = data.value if isinstance(data.value, str) else "".join(
            p.get("text", "") for p in data.value if isinstance(p, dict))
        yield from replay(data, conversation_id, owners, value, browser_id, settings_values, request)

    replay_inputs = [conversation_state, owners_state, session.browser_id, *settings]
    retry_ev = chatbot.retry(on_retry, replay_inputs, outputs, api_name=False)
    edit_ev = chatbot.edit(on_edit, replay_inputs, outputs, api_name=False)
    stop.click(None, None, None, cancels=[retry_ev, edit_ev], api_name=False)

    def on_like(data: gr.LikeData, conversation_id, owners, browser_id, request: gr.Request):
        identity = session.identity(request, browser_id)
        index = data.index if isinstance(data.index, int) else data.index[0]
        if not conversation_id or index >= len(owners) or data.liked is None:
            return
        try:
            turn = next((t for t in store.turns(conversation_id, identity.owner) if t.seq == owners[index]), None)
        except NotFoundError:
            return
        if turn is not None:
            store.add_feedback(turn.id, 1 if data.liked else -1, source="web", owner=identity.owner)
            gr.Info("Thanks: feedback saved for fine-tuning.")

    chatbot.like(on_like, [conversation_state, owners_state, session.browser_id], None, api_name=False)

    new_chat.click(lambda: ([], [], None), None, outputs, api_name=False)

    def open_conversation(cid, browser_id, request: gr.Request):
        identity = session.identity(request, browser_id)
        try:
            return (*render_history(runtime, cid, identity.owner), cid)
        except NotFoundError:
            return [], [], None

    conversations.change(open_conversation, [conversations, session.browser_id], outputs, api_name=False)

    def reload_adapters(browser_id, request: gr.Request):
        identity = session.identity(request, browser_id)
        if not identity.admin:
            raise gr.Error("Reloading adapters needs an admin login.")
        from bot.runtime import discover_adapters

        for name, path in discover_adapters(runtime.settings.home).items():
            try:
                engine.load_adapter(name, path)
            except ParleyError as exc:
                gr.Warning(f"{name}: {exc}")
        return gr.update(choices=adapter_choices())

    refresh.click(reload_adapters, session.browser_id, adapter, api_name=False)

    def mood(conversation_id, browser_id, request: gr.Request):
        import pandas as pd

        from bot.tools import conversation_mood

        owner = session.identity(request, browser_id).owner
        try:
            points = conversation_mood(store.history(conversation_id, owner)) if conversation_id else []
        except NotFoundError:
            points = []
        return pd.DataFrame({"message": list(range(1, len(points) + 1)),
                             "compound": [p["compound"] for p in points]})

    mood_refresh.click(mood, [conversation_state, session.browser_id], mood_plot, api_name=False)

    return ChatTab(adapter=adapter, run_turn=run_turn, load=load,
                   load_inputs=[conversation_state, session.browser_id, collections],
                   load_outputs=[chatbot, owners_state, conversation_state, conversations, adapter, collections,
                                 textbox, send])
