"""The Fine-tune tab: train a LoRA adapter on the chat's feedback, watch it, use it at once.

Training needs the admin role (ui/session.py, bot/owners.py): it books the machine and the new
adapter is served to everyone. The run is a separate process (bot/jobs.py), so closing the browser
does not stop it; the status is read from the job whenever the tab asks.
"""

from __future__ import annotations

import gradio as gr

from bot.engine import BASE
from bot.errors import ParleyError
from bot.runtime import Runtime
from ui.session import Session


def build_training_tab(runtime: Runtime, session: Session, adapter: gr.Dropdown) -> None:
    """Call inside ``with gr.Tab("Fine-tune"):``; ``adapter`` is the chat's adapter picker to refresh."""

    def adapter_choices() -> list[str]:
        return [BASE, *sorted(runtime.engine.adapters)]

    gr.Markdown("Fine-tune a LoRA adapter on the replies rated 👍 (and corrected) in the chat. "
                "Training runs in the background; when it finishes the adapter appears in the chat's "
                "Adapter menu and answers at once. Training needs an admin login.")
    with gr.Row():
        train_name = gr.Textbox(label="Adapter name", placeholder="feedback-…", scale=2, elem_id="parley-train-name")
        train_steps = gr.Number(value=30, precision=0, label="Max steps", scale=1)
        train_button = gr.Button("Train from feedback", variant="primary", scale=1, elem_id="parley-train")
        train_refresh = gr.Button("Refresh status", size="sm", scale=1)
    train_status = gr.Markdown("", elem_id="parley-train-status")

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

    def start_training(name, steps, browser_id, request: gr.Request):
        identity = session.identity(request, browser_id)
        try:
            identity.require_admin("Training")
            runtime.jobs.start_from_feedback(name or None, max_steps=int(steps) if steps else None)
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        return job_status()

    train_button.click(start_training, [train_name, train_steps, session.browser_id], [train_status, adapter],
                       api_name=False)
    train_refresh.click(job_status, None, [train_status, adapter], api_name=False)
