"""The browser chat: streaming replies, Stop, retry, edit, feedback, settings, server-side history.

The conversation lives in the store (server side); the browser only remembers which conversation
it had open (``gr.BrowserState``), so history survives a reload and a server restart. The UI
history is always rebuilt from the store, which keeps UI indexes and stored turns in step.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Iterator

import gradio as gr

from bot.assistant import TurnOptions
from bot.engine import BASE, GenerationParams
from bot.errors import ParleyError
from bot.events import Done, TextDelta, ToolFinished, ToolStarted
from bot.runtime import Runtime, discover_adapters

TOOL_CHOICES = ["search", "translate", "sentiment"]


def _sanitize(text: str) -> str:
    """Strip external images and script links from model output (markdown-image exfiltration)."""
    try:
        from bot.tools.safety import sanitize_markdown
    except ImportError:
        return text
    return sanitize_markdown(text)


def _sources_markdown(sources) -> str:
    lines = []
    for s in sources:
        where = s.get("source") or ""
        page = f", p. {s['page']}" if s.get("page") else ""
        quote = " ".join(str(s.get("text", "")).split())[:220]
        lines.append(f"**[{s.get('n', '?')}] {s.get('title') or where}**{page} — `{where}`\n> {quote}")
    return "\n\n".join(lines)


def render_history(runtime: Runtime, conversation_id: str | None) -> tuple[list[dict], list[int]]:
    """Chatbot messages for a stored conversation, and the turn seq that owns each message."""
    if not conversation_id:
        return [], []
    messages: list[dict] = []
    owners: list[int] = []
    for turn in runtime.store.turns(conversation_id):
        for m in turn.messages:
            if m["role"] == "user":
                messages.append({"role": "user", "content": m["content"]})
                owners.append(turn.seq)
        for call in turn.tool_calls:
            messages.append({"role": "assistant", "content": str(call.get("summary", "")),
                             "metadata": {"title": f"🔧 {call.get('name', 'tool')}", "status": "done"}})
            owners.append(turn.seq)
        reply = _sanitize(turn.reply)
        if turn.finish_reason == "cancelled":
            reply += " *(stopped)*"
        elif turn.finish_reason == "error":
            reply += f" *(error: {turn.usage.get('error') or 'generation failed'})*"
        messages.append({"role": "assistant", "content": reply})
        owners.append(turn.seq)
    return messages, owners


def build_ui(runtime: Runtime) -> gr.Blocks:
    store, engine = runtime.store, runtime.engine

    def adapter_choices() -> list[str]:
        return [BASE, *sorted(engine.adapters)]

    def conversation_choices() -> list[tuple[str, str]]:
        return [((c["title"] or "(untitled)")[:60], c["id"]) for c in store.list_conversations(50, source="web")]

    def load(conversation_id):
        if conversation_id:
            try:
                store.get_conversation(conversation_id)
            except ParleyError:
                conversation_id = None
        messages, owners = render_history(runtime, conversation_id)
        return (messages, owners, conversation_id, gr.update(choices=conversation_choices(), value=conversation_id),
                gr.update(choices=adapter_choices()))

    def options_from(system, temperature, top_p, max_tokens, seed, adapter, tools, always_search, conversation_id):
        params = GenerationParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                                  seed=int(seed) if seed not in (None, "", -1) and int(seed) >= 0 else None)
        return TurnOptions(params=engine.clamp(params), adapter=adapter or BASE, system_prompt=(system or None),
                           tools=tuple(tools or ()), always_search=bool(always_search), conversation_id=conversation_id,
                           source="web")

    def run_turn(user_text, conversation_id, settings):
        """Stream a turn: yields (chatbot messages, owners, conversation_id)."""
        if not conversation_id:
            conversation_id = store.create_conversation(source="web")
        history, owners = render_history(runtime, conversation_id)
        prior = store.history(conversation_id)
        options = options_from(*settings, conversation_id)
        shown = [*history, {"role": "user", "content": user_text}]
        cancel = threading.Event()
        try:
            events = runtime.assistant.respond([*prior, {"role": "user", "content": user_text}], options, cancel=cancel)
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        reply = ""
        steps: list[dict] = []
        event = None
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
                yield [*shown, *steps, {"role": "assistant", "content": _sanitize(reply)}], owners, conversation_id
        finally:
            cancel.set()  # Stop / closed tab: gradio closes this generator; the engine stops in a step
            events.close()
        messages, owners = render_history(runtime, conversation_id)
        if isinstance(event, Done) and event.sources:
            messages.append({"role": "assistant", "content": _sources_markdown(event.sources),
                             "metadata": {"title": f"📚 Sources ({len(event.sources)})"}})
            owners.append(owners[-1] if owners else 0)
        yield messages, owners, conversation_id

    with gr.Blocks(title="Parley", fill_height=True) as demo:
        conversation_state = gr.BrowserState(None, storage_key="parley-conversation")
        owners_state = gr.State([])
        with gr.Sidebar():
            gr.Markdown("### Parley")
            new_chat = gr.Button("New chat", variant="secondary")
            conversations = gr.Radio(label="Conversations", choices=[], type="value")
        chatbot = gr.Chatbot(label="Parley", height="70vh", editable="user", buttons=["copy"],
                             feedback_options=("Like", "Dislike"), sanitize_html=True,
                             placeholder="Ask anything. Slash commands: /search, /translate, /sentiment, /help")
        with gr.Row():
            textbox = gr.Textbox(placeholder="Message Parley…", show_label=False, scale=8, autofocus=True,
                                 elem_id="parley-input")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="parley-send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="parley-stop")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", value=runtime.settings.system_prompt, lines=2)
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.2, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top p")
                max_tokens = gr.Slider(16, runtime.settings.max_new_tokens_cap, value=runtime.settings.max_new_tokens,
                                       step=16, label="Max new tokens")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
            with gr.Row():
                adapter = gr.Dropdown(choices=adapter_choices(), value=BASE, label="Adapter", allow_custom_value=False)
                refresh = gr.Button("Reload adapters", size="sm")
                tools = gr.CheckboxGroup(TOOL_CHOICES, value=TOOL_CHOICES, label="Tools allowed")
                always_search = gr.Checkbox(False, label="Always search my documents")
        with gr.Accordion("Mood of the conversation", open=False):
            mood_plot = gr.LinePlot(x="message", y="compound", y_lim=[-1, 1], height=220,
                                    label="Sentiment of each of your messages (VADER compound, -1 to 1)")
            mood_refresh = gr.Button("Update", size="sm")
        with gr.Accordion("Train from feedback", open=False):
            gr.Markdown("Fine-tune a LoRA adapter on the replies rated 👍 (and corrected) in this chat. "
                        "Training runs in the background; when it finishes the adapter appears above.")
            with gr.Row():
                train_name = gr.Textbox(label="Adapter name", placeholder="feedback-…", scale=2)
                train_steps = gr.Number(value=30, precision=0, label="Max steps", scale=1)
                train_button = gr.Button("Train", variant="secondary", scale=1)
                train_refresh = gr.Button("Refresh status", size="sm", scale=1)
            train_status = gr.Markdown("")
        settings = [system, temperature, top_p, max_tokens, seed, adapter, tools, always_search]

        def job_status():
            jobs = list(runtime.jobs.jobs.values())
            if not jobs:
                return "No training run yet.", gr.update(choices=adapter_choices())
            job = jobs[-1]
            text = f"**{job.name}**: {job.status}" + (f" — {job.error}" if job.error else "")
            tail = job.tail(6)
            if tail:
                text += f"\n```\n{tail}\n```"
            return text, gr.update(choices=adapter_choices())

        def start_training(name, steps):
            try:
                runtime.jobs.start_from_feedback(name or None, max_steps=int(steps) if steps else None)
            except ParleyError as exc:
                raise gr.Error(str(exc)) from None
            return job_status()

        train_button.click(start_training, [train_name, train_steps], [train_status, adapter], api_name=False)
        train_refresh.click(job_status, None, [train_status, adapter], api_name=False)

        def submit(user_text, conversation_id, *settings_values):
            if not user_text or not user_text.strip():
                raise gr.Error("Type a message first.")
            yield from run_turn(user_text, conversation_id, settings_values)

        def clear_box():
            return ""

        outputs = [chatbot, owners_state, conversation_state]
        events = []
        for trigger in (textbox.submit, send.click):
            ev = trigger(submit, [textbox, conversation_state, *settings], outputs, api_name=False,
                         concurrency_limit=runtime.settings.max_batch_size)
            ev.then(lambda: gr.update(choices=conversation_choices()), None, conversations, api_name=False)
            trigger(clear_box, None, textbox, api_name=False, queue=False)
            events.append(ev)
        stop.click(None, None, None, cancels=events, api_name=False)

        def replay(data, conversation_id, owners, edited, *settings_values):
            index = data.index if isinstance(data.index, int) else data.index[0]
            if not conversation_id or index >= len(owners):
                raise gr.Error("Nothing to retry here.")
            seq = owners[index]
            turn = next((t for t in store.turns(conversation_id) if t.seq == seq), None)
            if turn is None:
                raise gr.Error("That message is no longer stored; reload the conversation.")
            user_text = edited if edited is not None else next(
                (m["content"] for m in turn.messages if m["role"] == "user"), "")
            store.truncate_after(conversation_id, seq - 1)
            yield from run_turn(user_text, conversation_id, settings_values)

        def on_retry(data: gr.RetryData, conversation_id, owners, *settings_values):
            yield from replay(data, conversation_id, owners, None, *settings_values)

        def on_edit(data: gr.EditData, conversation_id, owners, *settings_values):
            value = data.value if isinstance(data.value, str) else "".join(
                p.get("text", "") for p in data.value if isinstance(p, dict))
            yield from replay(data, conversation_id, owners, value, *settings_values)

        retry_ev = chatbot.retry(on_retry, [conversation_state, owners_state, *settings], outputs, api_name=False)
        edit_ev = chatbot.edit(on_edit, [conversation_state, owners_state, *settings], outputs, api_name=False)
        stop.click(None, None, None, cancels=[retry_ev, edit_ev], api_name=False)

        def on_like(data: gr.LikeData, conversation_id, owners):
            index = data.index if isinstance(data.index, int) else data.index[0]
            if not conversation_id or index >= len(owners) or data.liked is None:
                return
            turn = next((t for t in store.turns(conversation_id) if t.seq == owners[index]), None)
            if turn is not None:
                store.add_feedback(turn.id, 1 if data.liked else -1, source="web")
                gr.Info("Thanks: feedback saved for fine-tuning.")

        chatbot.like(on_like, [conversation_state, owners_state], None, api_name=False)

        def start_new():
            return [], [], None

        new_chat.click(start_new, None, outputs, api_name=False)
        conversations.change(lambda cid: render_history(runtime, cid) + (cid,), conversations, outputs,
                             api_name=False)

        def reload_adapters():
            for name, path in discover_adapters(runtime.settings.home).items():
                try:
                    engine.load_adapter(name, path)
                except ParleyError as exc:
                    gr.Warning(f"{name}: {exc}")
            return gr.update(choices=adapter_choices())

        refresh.click(reload_adapters, None, adapter, api_name=False)

        def mood(conversation_id):
            import pandas as pd

            try:
                from bot.tools import conversation_mood
            except ImportError:
                return pd.DataFrame({"message": [], "compound": []})
            points = conversation_mood(store.history(conversation_id)) if conversation_id else []
            return pd.DataFrame({"message": list(range(1, len(points) + 1)),
                                 "compound": [p["compound"] for p in points]})

        mood_refresh.click(mood, conversation_state, mood_plot, api_name=False)
        demo.load(load, conversation_state, [chatbot, owners_state, conversation_state, conversations, adapter],
                  api_name=False)

        # A plain, documented API for scripts and tests (gradio_client): one message in, the reply out.
        def api_chat(message: str, conversation_id: str | None = None, temperature: float = 0.0,
                     max_tokens: int = 128, adapter_name: str = BASE) -> Iterator[tuple[str, str]]:
            """Send one message; streams (reply_so_far, conversation_id)."""
            if not message or not str(message).strip():
                raise gr.Error("message is empty")
            reply, cid = "", conversation_id
            values = (None, temperature, 1.0, max_tokens, -1, adapter_name, TOOL_CHOICES, False)
            for messages, _, cid in run_turn(message, conversation_id, values):
                last = messages[-1] if messages else {}
                if last.get("role") == "assistant" and not last.get("metadata"):
                    reply = last["content"]
                yield reply, cid

        gr.api(api_chat, api_name="chat", concurrency_limit=runtime.settings.max_batch_size)
    demo.queue(default_concurrency_limit=runtime.settings.max_batch_size, max_size=runtime.settings.queue_size)
    return demo
