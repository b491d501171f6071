"""The browser app: one builder per tab, composed here (the way LLaMA-Factory's web UI has one
component module per tab). Tabs hold no model logic; they call the runtime.

- Chat (ui/chat.py): streaming chat with tools, sources, feedback, history, adapters.
- Documents (ui/documents.py): collections, uploads with progress, the documents list.
- Fine-tune (ui/training.py): train an adapter on the chat's feedback.
- Compare (ui/compare.py): two answers to one prompt, a blind vote, the leaderboard.
- Training vs inference (ui/insights.py): each adapter's training cost beside its serving speed.

Who is asking is decided on the server for every event (ui/session.py): the logged-in user, or
this browser's random id.
"""

from __future__ import annotations

from typing import Iterator

import gradio as gr

from bot.engine import BASE
from bot.owners import LOCAL, Identity
from bot.runtime import Runtime
from bot.tool_names import TOOL_NAMES
from ui.chat import build_chat_tab
from ui.compare import build_compare_tab
from ui.insights import build_insights_tab
from ui.session import ensure_browser_id, make_session
from ui.training import build_training_tab


def build_ui(runtime: Runtime) -> gr.Blocks:
    access = runtime.access
    with gr.Blocks(title="Parley", fill_height=True) as demo:
        session = make_session(access)
        if access.oauth:  # a Space with Hugging Face sign-in: visitors' data becomes theirs
            gr.LoginButton()
        with gr.Tabs(elem_id="parley-tabs"):
            with gr.Tab("Chat", id="chat", elem_id="parley-tab-chat"):
                chat = build_chat_tab(runtime, session)
            with gr.Tab("Documents", id="documents", elem_id="parley-tab-documents"):
                try:
                    from ui.documents import build_documents_tab
                except ImportError:  # the documents half is optional in a trimmed install
                    gr.Markdown("Documents are not available in this installation.")
                else:
                    build_documents_tab(runtime, session)
            with gr.Tab("Fine-tune", id="finetune", elem_id="parley-tab-finetune"):
                build_training_tab(runtime, session, chat.adapter)
            with gr.Tab("Compare", id="compare", elem_id="parley-tab-compare"):
                build_compare_tab(runtime, session)
            with gr.Tab("Training vs inference", id="insights", elem_id="parley-tab-insights"):
                build_insights_tab(runtime, session)

        # The browser id first (a new visitor gets one), then everything that needs to know who it is.
        demo.load(ensure_browser_id, session.browser_id, session.browser_id, api_name=False).then(
            chat.load, chat.load_inputs, chat.load_outputs, api_name=False)

        # A plain, documented API for scripts and tests (gradio_client): one message in, the reply out.
        def api_chat(message: str, conversation_id: str | None = None, temperature: float = 0.0,
                     max_tokens: int = 128, adapter_name: str = BASE,
                     request: gr.Request = None) -> Iterator[tuple[str, str]]:
            """Send one message; streams (reply_so_far, conversation_id)."""
            if not message or not str(message).strip():
                raise gr.Error("message is empty")
            identity = api_identity(request)
            reply, cid = "", conversation_id
            values = (None, temperature, 1.0, max_tokens, -1, adapter_name, TOOL_NAMES, False, ("default",))
            for messages, _, cid in chat.run_turn(identity, message, conversation_id, values):
                last = messages[-1] if messages else {}
                if last.get("role") == "assistant" and not last.get("metadata"):
                    reply = last["content"]
                yield reply, cid

        def api_identity(request: gr.Request | None) -> Identity:
            # Script callers have no browser id: with logins they are the logged-in user; without,
            # they are the same "local" person as /v1 clients of a server without keys.
            if access.login_required:
                return session.identity(request, None)
            return Identity(LOCAL, admin=access.loopback)

        gr.api(api_chat, api_name="chat", concurrency_limit=runtime.settings.max_batch_size)
    demo.queue(default_concurrency_limit=runtime.settings.max_batch_size, max_size=runtime.settings.queue_size)
    return demo
