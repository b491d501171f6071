"""The Compare tab: one prompt, two answers side by side, a blind vote, a leaderboard.

Any two of base and the loaded adapters answer the same prompt together (one batch). In blind
mode the sides are shuffled and the names stay hidden until the vote. Each side is resolved by
the engine before generating: the pane records which adapter folder answered (or the base model
with no adapter at all), and two sides that resolve to the same weights are refused — the
failure users report elsewhere is a "base" pane silently answered by the fine-tuned model.

Votes go to the preference store (bot/preferences.py) with the full prompt and the voter; they
become DPO pairs (``parley finetune dpo --data preferences``) and the leaderboard below.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import gradio as gr

from bot.chat import with_system_prompt
from bot.engine import BASE, GenerationParams
from bot.errors import ParleyError
from bot.events import Done, TextDelta
from bot.preferences import Preferences
from bot.runtime import Runtime
from bot.tools.safety import sanitize_markdown
from ui.session import Session

VERDICT_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


def _who(runtime: Runtime, name: str) -> dict[str, Any]:
    """What really answers for ``name``: the engine's own record of it, checked before generating."""
    runtime.engine.require_adapter(name)
    if name == BASE:
        return {"name": BASE, "weights": f"{runtime.engine.model_name} (no adapter)"}
    return {"name": name, "weights": str(runtime.engine.adapters[name])}


def build_compare_tab(runtime: Runtime, session: Session) -> None:
    """Call inside ``with gr.Tab("Compare"):``."""
    preferences = Preferences(runtime.store)

    def choices() -> list[str]:
        return [BASE, *sorted(runtime.engine.adapters)]

    gr.Markdown("Ask one question, get two answers, say which is better. In blind mode the sides are "
                "shuffled and named only after your vote. Votes train the next adapter "
                "(`parley finetune dpo --data preferences`) and fill the leaderboard.")
    with gr.Row():
        first = gr.Dropdown(choices(), value=BASE, label="Model 1", elem_id="parley-compare-1")
        second = gr.Dropdown(choices(), value=(choices()[1:] or [BASE])[0], label="Model 2",
                             elem_id="parley-compare-2")
        blind = gr.Checkbox(True, label="Blind (shuffle sides, hide names until the vote)")
        refresh = gr.Button("Reload models", size="sm")
    prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Ask something both should answer",
                        elem_id="parley-compare-prompt")
    with gr.Row():
        cap = runtime.settings.max_new_tokens_cap
        max_tokens = gr.Slider(min(8, cap - 1), cap, value=min(128, cap), step=1, label="Max new tokens")
        generate = gr.Button("Generate both", variant="primary", elem_id="parley-compare-go")
    with gr.Row():
        with gr.Column():
            title_a = gr.Markdown("### A")
            answer_a = gr.Markdown(elem_id="parley-compare-a")
        with gr.Column():
            title_b = gr.Markdown("### B")
            answer_b = gr.Markdown(elem_id="parley-compare-b")
    better = gr.Textbox(label="A better answer (optional: it becomes the chosen answer for training)", lines=2)
    with gr.Row():
        buttons = {v: gr.Button(label, elem_id=f"parley-vote-{v}") for v, label in VERDICT_LABELS.items()}
    result = gr.Markdown(elem_id="parley-compare-result")
    with gr.Accordion("Leaderboard (blind votes)", open=True):
        board = gr.Dataframe(headers=["model", "strength", "win rate", "95% interval", "games"],
                             interactive=False, elem_id="parley-leaderboard")
        board_refresh = gr.Button("Refresh", size="sm")
    current = gr.State(None)

    def leaderboard():
        return [[s.model, s.strength, s.win_rate, f"{s.low:.2f}–{s.high:.2f}", s.games]
                for s in preferences.leaderboard()]

    def run(text, model_1, model_2, is_blind, tokens, browser_id, request: gr.Request):
        session.identity(request, browser_id)  # anyone may compare; the vote records who
        if not text or not text.strip():
            raise gr.Error("Type a prompt first.")
        try:
            sides = [_who(runtime, model_1), _who(runtime, model_2)]
        except ParleyError as exc:
            raise gr.Error(f"{exc} (reload the models)") from None
        if sides[0]["weights"] == sides[1]["weights"]:
            raise gr.Error("Both sides would be answered by the same weights: pick two different models.")
        if is_blind:
            random.shuffle(sides)
        messages = with_system_prompt([{"role": "user", "content": text}], runtime.settings.system_prompt)
        params = runtime.engine.clamp(GenerationParams(max_new_tokens=int(tokens), temperature=0.0))
        cancel = threading.Event()
        streams = [runtime.engine.stream(messages, params, adapter=s["name"], cancel=cancel) for s in sides]
        texts, open_streams = ["", ""], [True, True]
        titles = ["### A" + ("" if is_blind else f" — {sides[0]['name']}"),
                  "### B" + ("" if is_blind else f" — {sides[1]['name']}")]
        try:
            while any(open_streams):  # both decode in one batch; read them in turn
                for i, events in enumerate(streams):
                    if not open_streams[i]:
                        continue
                    event = next(events, None)
                    if event is None or isinstance(event, Done):
                        open_streams[i] = False
                        if isinstance(event, Done) and event.error:
                            texts[i] += f"\n\n*(error: {event.error})*"
                    elif isinstance(event, TextDelta):
                        texts[i] += event.text
                yield (*titles, sanitize_markdown(texts[0]), sanitize_markdown(texts[1]), None, "")
        finally:
            cancel.set()
            for events in streams:
                events.close()
        state = {"prompt": messages, "sides": sides, "answers": texts, "blind": bool(is_blind)}
        yield (*titles, sanitize_markdown(texts[0]), sanitize_markdown(texts[1]), state,
               "Now vote: which answer is better?")

    def vote(verdict, state, better_text, browser_id, request: gr.Request):
        identity = session.identity(request, browser_id)
        if not state:
            raise gr.Error("Generate two answers first.")
        a, b = state["sides"]
        try:
            preferences.add_vote(owner=identity.owner, prompt=state["prompt"], model_a=a["name"], model_b=b["name"],
                                 answer_a=state["answers"][0], answer_b=state["answers"][1], verdict=verdict,
                                 better=better_text, blind=state["blind"])
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        reveal = (f"Saved: **{VERDICT_LABELS[verdict]}**. A was **{a['name']}** ({a['weights']}), "
                  f"B was **{b['name']}** ({b['weights']}).")
        return (f"### A — {a['name']}", f"### B — {b['name']}", None, reveal, "", leaderboard())

    def reload():
        return gr.update(choices=choices()), gr.update(choices=choices())

    generate.click(run, [prompt, first, second, blind, max_tokens, session.browser_id],
                   [title_a, title_b, answer_a, answer_b, current, result], api_name=False)
    def voter(verdict: str):
        def on_vote(state, better_text, browser_id, request: gr.Request):
            return vote(verdict, state, better_text, browser_id, request)
        return on_vote

    for verdict, button in buttons.items():
        button.click(voter(verdict), [current, better, session.browser_id],
                     [title_a, title_b, current, result, better, board], api_name=False)
    refresh.click(reload, None, [first, second], api_name=False)
    board_refresh.click(leaderboard, None, board, api_name=False)
