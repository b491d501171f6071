"""The Fine-tune tab: bring data, see what will be trained, pick settings, run, watch, compare runs.

1. Data: upload a file (every format finetune reads), pick one under PARLEY_HOME, or use the chat's
   feedback and votes. The preview shows the detected format, a few rows rendered in the model's
   chat template with the trained tokens highlighted (from the recipes' own encoders:
   bot/training_data.py), a token-length histogram and the rejected rows as ``file:line: reason``.
2. Settings: presets (quick / balanced / thorough) and every field of the recipe's config behind
   "Advanced" (built from finetune.lora.LoraConfig / finetune.dpo.DpoConfig, with their docs); a
   pre-flight estimate measures a few steps of this data on this machine.
3. Run: a background process (bot/jobs.py) that survives closing the browser and restarting the
   server; a timer re-reads the run folder and redraws the curves. Stop and save, Cancel, Resume;
   then "Chat with it" or "Compare with base".
4. History: every run with status, data, settings, final eval loss and duration; two runs' curves
   overlaid and their settings diff; delete a run.

Every action needs the admin role (ui/session.py, bot/owners.py): training books the machine, the
adapter is served to everyone, and the data may be anyone's chats.
"""

from __future__ import annotations

import ast
import html
import inspect
import math
import shutil
import textwrap
import time
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr

from bot.engine import BASE
from bot.errors import ParleyError
from bot.runtime import Runtime
from ui.session import Session

UPLOAD, HOME_FILE, CHAT = "Upload a file", "A file under PARLEY_HOME", "The chat's feedback and votes"
SFT, DPO, SFT_DPO = "SFT (LoRA on conversations)", "DPO (preference pairs)", "SFT then DPO"
RECIPE_KIND = {SFT: "sft", DPO: "dpo", SFT_DPO: "sft+dpo"}
MAX_UPLOAD_BYTES = 1_000_000_000
"""Largest training file taken by upload; bigger ones go under PARLEY_HOME and are picked there."""
UPLOAD_SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".gz"]

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"rank": 8, "alpha": 16, "learning_rate": 2e-4, "batch_size": 4, "grad_accum": 1, "max_steps": 30,
              "epochs": 1, "max_length": 512, "eval_every": 10, "save_every": 10, "warmup_ratio": 0.1,
              "use_rslora": False},
    "balanced": {"rank": 16, "alpha": 32, "learning_rate": 2e-4, "batch_size": 4, "grad_accum": 4, "max_steps": 0,
                 "epochs": 1, "max_length": 1024, "eval_every": 25, "save_every": 25, "warmup_ratio": 0.03,
                 "use_rslora": False},
    "thorough": {"rank": 32, "alpha": 64, "learning_rate": 1e-4, "batch_size": 4, "grad_accum": 4, "max_steps": 0,
                 "epochs": 3, "max_length": 2048, "eval_every": 50, "save_every": 50, "warmup_ratio": 0.03,
                 "use_rslora": True},
}
"""quick: 30 steps to see that it learns (minutes on a CPU); balanced: one pass over the data;
thorough: three passes at a higher rank."""
DPO_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"max_steps": 20, "batch_size": 2, "grad_accum": 2, "learning_rate": 5e-5, "beta": 0.1, "rank": 8,
              "alpha": 16, "max_length": 512, "save_every": 10},
    "balanced": {"max_steps": 0, "epochs": 1, "batch_size": 2, "grad_accum": 4, "learning_rate": 5e-5, "beta": 0.1,
                 "rank": 16, "alpha": 32, "max_length": 1024, "save_every": 25},
    "thorough": {"max_steps": 0, "epochs": 2, "batch_size": 2, "grad_accum": 8, "learning_rate": 2e-5, "beta": 0.1,
                 "rank": 32, "alpha": 64, "max_length": 2048, "save_every": 50},
}
CHOICES = {"format": ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"),
           "overlong": ("reject", "truncate"), "lr_scheduler": ("cosine", "linear", "constant"),
           "precision": ("auto", "bf16", "fp32"), "nan_policy": ("abort", "skip"), "device": ("auto", "cpu", "cuda"),
           "loss_type": ("sigmoid", "ipo", "hinge")}
HIDDEN_FIELDS = {"data", "output", "eval_data", "model", "resume", "overwrite", "progress", "stop_after_steps",
                 "init_adapter"}
HISTORY_HEADERS = ["Run", "Recipe", "Status", "Data", "Steps", "Final eval loss", "Reward margin", "Duration",
                   "Started", "Adapters"]
TAB_SWITCH_JS = """(label) => { const tabs = [...document.querySelectorAll('#parley-tabs button[role="tab"]')];
  const tab = tabs.find(b => b.textContent.trim() === label); if (tab) tab.click(); }"""


@dataclass
class TrainingTab:
    """What the Fine-tune tab gives the rest of the app.

    ``compare_request`` is set when someone presses "Compare with base": a dict
    ``{"a": "base", "b": ADAPTER, "run": RUN, "requested_at": epoch}``; the Compare tab listens
    with ``compare_request.change(...)`` and reads it with ``compare_pair(value)``.
    """

    compare_request: gr.State


def compare_pair(value: Any) -> tuple[str, str] | None:
    """The (left, right) models a "Compare with base" request names, or None for no request."""
    if isinstance(value, dict) and value.get("a") and value.get("b"):
        return str(value["a"]), str(value["b"])
    return None


# ------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested): settings fields, curves, tables, the preview's HTML
# ------------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def settings_fields(cls) -> list[tuple[str, type, Any, str]]:
    """(name, type, default, doc) of every field the tab shows for a recipe config."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in fields(cls):
        if f.name in HIDDEN_FIELDS:
            continue
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        out.append((f.name, hints.get(f.name, str), default, docs.get(f.name, "")))
    return out


def changed_settings(spec: list[tuple[str, type, Any, str]], values: list[Any]) -> dict[str, Any]:
    """The settings that differ from the recipe's defaults, cast to their field types."""
    out = {}
    for (name, kind, default, _), value in zip(spec, values):
        if value is None or value == "":
            continue
        if kind is int:
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is bool:
            value = bool(value)
        if value != default:
            out[name] = value
    return out


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def curve_frames(records: list[dict[str, Any]], resources: list[dict[str, Any]] | None = None,
                 prefix: str = "") -> dict[str, Any]:
    """metrics.jsonl records -> the DataFrames the LinePlots draw.

    ``loss``: step, value, series (train raw, train smoothed, eval); ``lr``, ``tokens``: step,
    value; ``memory``: minutes, value (MB); ``margin``: step, value, series (DPO reward margin).
    A run of several stages numbers steps on through them (DPO's step 1 follows SFT's last).
    """
    import pandas as pd

    loss, lr, tokens, margin = [], [], [], []
    offset, stage, last_step = 0, None, 0
    train: list[tuple[int, float, str]] = []
    for r in records:
        if r.get("stage") != stage:
            if stage is not None:
                offset = last_step
            stage = r.get("stage")
        step = offset + int(r.get("step", 0))
        last_step = max(last_step, step)
        tag = f"{stage} " if stage and any(x.get("stage") != stage for x in records) else ""
        if isinstance(r.get("loss"), (int, float)) and not r.get("skipped") and math.isfinite(r["loss"]):
            train.append((step, float(r["loss"]), tag))
            if isinstance(r.get("lr"), (int, float)):
                lr.append({"step": step, "value": float(r["lr"])})
            if isinstance(r.get("tokens_per_s"), (int, float)):
                tokens.append({"step": step, "value": float(r["tokens_per_s"])})
            if isinstance(r.get("reward_margin"), (int, float)):
                margin.append({"step": step, "value": float(r["reward_margin"]), "series": f"{prefix}train"})
        if isinstance(r.get("eval_loss"), (int, float)) and math.isfinite(r["eval_loss"]):
            loss.append({"step": step, "value": float(r["eval_loss"]), "series": f"{prefix}{tag}eval"})
        if isinstance(r.get("eval_reward_margin"), (int, float)):
            margin.append({"step": step, "value": float(r["eval_reward_margin"]), "series": f"{prefix}eval"})
    for tag in dict.fromkeys(t for _, _, t in train):
        points = [(s, v) for s, v, t in train if t == tag]
        loss += [{"step": s, "value": v, "series": f"{prefix}{tag}train (raw)"} for s, v in points]
        loss += [{"step": s, "value": v, "series": f"{prefix}{tag}train (smoothed)"}
                 for (s, _), v in zip(points, smooth([v for _, v in points]))]
    memory = []
    if resources:
        t0 = resources[0].get("t", 0)
        memory = [{"minutes": round((r.get("t", t0) - t0) / 60, 3), "value": r["rss_mb"]} for r in resources
                  if isinstance(r.get("rss_mb"), (int, float))]
    frame = lambda rows, cols: pd.DataFrame(rows, columns=cols)  # noqa: E731
    return {"loss": frame(loss, ["step", "value", "series"]), "lr": frame(lr, ["step", "value"]),
            "tokens": frame(tokens, ["step", "value"]), "memory": frame(memory, ["minutes", "value"]),
            "margin": frame(margin, ["step", "value", "series"])}


def length_histogram(lengths: list[int]):
    """Rows per token-length bin (about 20 bins of a round width)."""
    import pandas as pd

    if not lengths:
        return pd.DataFrame({"tokens": [], "rows": []})
    raw = max(1, max(lengths) / 20)
    width = next(w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 1 << 30) if w >= raw)
    counts: dict[int, int] = {}
    for n in lengths:
        counts[n // width * width] = counts.get(n // width * width, 0) + 1
    return pd.DataFrame({"tokens": [f"{b}-{b + width - 1}" for b in sorted(counts)],
                         "rows": [counts[b] for b in sorted(counts)]})


def preview_html(preview) -> str:
    """The preview's rows as HTML: trained tokens in <mark class="parley-trained">, text escaped."""
    parts = ['<div class="parley-preview" style="font-size:0.9em">',
             '<p>Highlighted: the tokens the loss is computed on (the assistant\'s reply and its end-of-turn '
             'token). The rest is context the model reads but is not trained to write.</p>']
    if not preview.samples:
        parts.append("<p><em>No row could be encoded: see the rejected rows.</em></p>")
    for s in preview.samples:
        head = f"{html.escape(s.source)} · {s.tokens} tokens, {s.trained} trained"
        if s.label:
            head += f" · <strong>{html.escape(s.label)}</strong>"
        body = "".join(
            f'<mark class="parley-trained" style="background:#fde68a;color:#111;padding:0">{html.escape(t)}</mark>'
            if trained else f'<span class="parley-context" style="opacity:0.75">{html.escape(t)}</span>'
            for t, trained in s.segments)
        parts.append(f'<div class="parley-sample"><div style="font-weight:600;margin-top:0.6em">{head}</div>'
                     f'<pre style="white-space:pre-wrap;word-break:break-word;margin:0.2em 0">{body}</pre></div>')
    parts.append("</div>")
    return "".join(parts)


def preview_summary(preview) -> str:
    s = preview.summary()
    formats = ", ".join(f"{k}: **{v}**" for k, v in s["formats"].items()) or "-"
    text = (f"**Format**: {formats}  ·  **rows read** {s['rows_read']:,}  ·  **kept** {s['kept']:,}  ·  "
            f"**rejected** {s['rejected']:,}  ·  **trained tokens** {s['tokens_trained']:,}  ·  "
            f"**longest** {s['longest']:,} tokens")
    if s["truncated_read"]:
        text += "  \n(a large file: the preview read its first rows only; the run reads them all)"
    return text


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s // 60 % 60:02d} min"


def estimate_text(estimates: list[dict[str, Any]]) -> str:
    lines = []
    total = 0.0
    for e in estimates:
        total += e["total_s"]
        mem = f"{e['peak_memory_mb'] / 1024:.2f} GB" if e.get("peak_memory_mb") else "?"
        tps = f", {e['tokens_per_s']:,.0f} tokens/s" if e.get("tokens_per_s") else ""
        lines.append(f"**{e['kind'].upper()}**: {e['sec_per_step']:.2f} s per step (measured on {e['probe_steps']} "
                     f"steps of this data here{tps}) × {e['planned_steps']} steps + {fmt_seconds(e['startup_s'])} "
                     f"start-up ≈ **{fmt_seconds(e['total_s'])}**; peak memory ≈ **{mem}**")
    if len(estimates) > 1:
        lines.append(f"**Total ≈ {fmt_seconds(total)}**")
    lines.append("Evaluations add a little on top; the longest batches may need more memory than the probe's.")
    return "  \n".join(lines)


def history_rows(history: list[dict[str, Any]]) -> list[list[Any]]:
    def num(v, digits=4):
        return round(v, digits) if isinstance(v, (int, float)) else ""

    return [[h["name"], h["kind"], h["status"], h["data"], h["steps"] or "", num(h["final_eval_loss"]),
             num(h["reward_margin"]), fmt_seconds(h["duration_s"]) if h["duration_s"] is not None else "",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(h["started_at"])) if h["started_at"] else "",
             ", ".join(h["usable"])] for h in history]


def settings_diff(a: dict[str, Any], b: dict[str, Any]) -> list[list[Any]]:
    return [[k, str(a.get(k, "")), str(b.get(k, ""))] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def status_text(job, progress: dict[str, Any]) -> str:
    status = progress["status"]
    if progress.get("stop_requested") and status == "running":
        status = "stopping: finishing the step, then saving"
    text = f"**{job.name}** ({job.kind}): **{status}**"
    if progress.get("stage") and job.kind == "sft+dpo":
        text += f" · stage {progress['stage']}"
    if progress.get("total_steps"):
        text += f" · step {progress['step']} of {progress['total_steps']}"
    if progress.get("elapsed_s") is not None:
        text += f" · elapsed {fmt_seconds(progress['elapsed_s'])}"
    if status.startswith("running") and progress.get("eta_s") is not None:
        text += f" · ETA {fmt_seconds(progress['eta_s'])}"
        if progress.get("stages_after"):
            text += f" (then {', '.join(progress['stages_after'])})"
    if job.error:
        text += f"  \n⚠️ {job.error}"
    return text


# ------------------------------------------------------------------------------------------------
# The tab
# ------------------------------------------------------------------------------------------------
def build_training_tab(runtime: Runtime, session: Session, adapter: gr.Dropdown) -> TrainingTab:
    """Call inside ``with gr.Tab("Fine-tune"):``; ``adapter`` is the chat's adapter picker to refresh."""
    from bot import training_data
    from finetune.dpo import DpoConfig
    from finetune.lora import LoraConfig

    jobs = runtime.jobs
    home = Path(runtime.settings.home)
    lora_spec = settings_fields(LoraConfig)
    dpo_spec = settings_fields(DpoConfig)
    tokenizer_cache: dict[str, Any] = {}

    def tokenizer():
        if "t" not in tokenizer_cache:
            tok = getattr(runtime.engine, "tokenizer", None)
            if tok is None:  # a remote backend: read the model's own tokenizer
                from transformers import AutoTokenizer

                from bot.models import resolve_model
                tok = AutoTokenizer.from_pretrained(resolve_model(runtime.settings.model, home, progress=False))
            tokenizer_cache["t"] = tok
        return tokenizer_cache["t"]

    def adapter_choices() -> list[str]:
        return [BASE, *sorted(runtime.engine.adapters)]

    def admin(request, browser_id, what="Training"):
        identity = session.identity(request, browser_id)
        try:
            identity.require_admin(what)
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        return identity

    def run_names() -> list[str]:
        return [h["name"] for h in jobs.history()]

    gr.Markdown("Fine-tune an adapter on your data, or on the chat's feedback and votes. Runs go on in the "
                "background (close the page, come back, restart the server: the run continues and this tab "
                "finds it again); a finished adapter appears in the chat's Adapter menu at once. "
                "Training needs an admin login.")
    with gr.Row():
        quick_button = gr.Button("Train from votes and feedback", variant="secondary", elem_id="parley-train",
                                 scale=1)
        quick_info = gr.Markdown("One click: SFT on the replies rated 👍 and the corrections, then DPO on the "
                                 "votes (either one alone when only one kind exists), quick settings.",
                                 elem_id="parley-train-status")

    # ---- 1. Data -------------------------------------------------------------------------------------
    with gr.Accordion("1. Data", open=True):
        with gr.Row():
            source = gr.Radio([UPLOAD, HOME_FILE, CHAT], value=UPLOAD, label="Data from", elem_id="parley-ft-source")
            recipe = gr.Radio([SFT, DPO, SFT_DPO], value=SFT, label="Recipe", elem_id="parley-ft-recipe",
                              info="SFT learns to write the assistant turns; DPO learns to prefer the chosen "
                                   "reply over the rejected one (prompt/chosen/rejected pairs).")
        upload = gr.File(label="Training file (.jsonl, .json, .csv, .tsv, .gz: OpenAI messages, ShareGPT, Alpaca, "
                               "prompt/completion, text; or prompt/chosen/rejected pairs for DPO)",
                         file_types=UPLOAD_SUFFIXES, elem_id="parley-ft-upload", height=120)
        with gr.Row(visible=False) as home_row:
            home_file = gr.Dropdown(choices=[], label="File under PARLEY_HOME", allow_custom_value=False,
                                    elem_id="parley-ft-home-file", scale=4)
            home_refresh = gr.Button("Refresh list", size="sm", scale=1)
        data_path = gr.State("")
        preview_button = gr.Button("Preview", size="sm", elem_id="parley-ft-preview-button")
        data_summary = gr.Markdown("", elem_id="parley-ft-data-summary")
        preview_box = gr.HTML("", elem_id="parley-ft-preview")
        with gr.Row():
            lengths_plot = gr.BarPlot(x="tokens", y="rows", title="Token length of each row", x_title="tokens",
                                      y_title="rows", height=220, elem_id="parley-ft-lengths", sort=None,
                                      y_lim=[0, None])
            rejects_box = gr.Textbox(label="Rejected rows (file:line: reason)", lines=8, max_lines=12,
                                     interactive=False, elem_id="parley-ft-rejects")

    # ---- 2. Settings ----------------------------------------------------------------------------------
    with gr.Accordion("2. Settings", open=True):
        with gr.Row():
            run_name = gr.Textbox(label="Adapter name", placeholder="letters, digits, - and _", scale=2,
                                  elem_id="parley-train-name")
            preset = gr.Radio(list(PRESETS), value="quick", label="Preset", scale=2, elem_id="parley-ft-preset",
                              info="quick: 30 steps to see it learn; balanced: one pass; thorough: 3 passes")
        lora_box, lora_inputs = _settings_accordion("Advanced: every SFT (LoRA) setting", lora_spec,
                                                    PRESETS["quick"], "lora", visible=True)
        dpo_box, dpo_inputs = _settings_accordion("Advanced: every DPO setting", dpo_spec, DPO_PRESETS["quick"],
                                                  "dpo", visible=False)
        with gr.Row():
            estimate_button = gr.Button("Estimate time and memory", elem_id="parley-ft-estimate")
            start_button = gr.Button("Start training", variant="primary", elem_id="parley-ft-start")
        estimate_box = gr.Markdown("", elem_id="parley-ft-estimate-text")

    # ---- 3. The run -----------------------------------------------------------------------------------
    with gr.Accordion("3. Run", open=True):
        with gr.Row():
            run_picker = gr.Dropdown(choices=[], label="Run", allow_custom_value=True, scale=3,
                                     elem_id="parley-ft-run")
            stop_button = gr.Button("Stop and save", visible=False, elem_id="parley-ft-stop", scale=1)
            cancel_button = gr.Button("Cancel", visible=False, variant="stop", elem_id="parley-ft-cancel", scale=1)
            resume_button = gr.Button("Resume", visible=False, elem_id="parley-ft-resume", scale=1)
            chat_button = gr.Button("Chat with it", visible=False, variant="primary", elem_id="parley-ft-chat", scale=1)
            compare_button = gr.Button("Compare with base", visible=False, elem_id="parley-ft-compare", scale=1)
        run_status = gr.Markdown("No run yet.", elem_id="parley-ft-run-status")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss", y_title="loss per token",
                                    height=260, elem_id="parley-ft-loss-plot")
            lr_plot = gr.LinePlot(x="step", y="value", title="Learning rate", height=260, elem_id="parley-ft-lr-plot")
        with gr.Row():
            tokens_plot = gr.LinePlot(x="step", y="value", title="Tokens per second", height=220,
                                      elem_id="parley-ft-tokens-plot")
            memory_plot = gr.LinePlot(x="minutes", y="value", title="Memory of the training process (MB)",
                                      height=220, elem_id="parley-ft-memory-plot")
            margin_plot = gr.LinePlot(x="step", y="value", color="series", title="DPO reward margin", height=220,
                                      visible=False, elem_id="parley-ft-margin-plot")
        run_log = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, autoscroll=True,
                             elem_id="parley-ft-log")
    compare_request = gr.State(None)
    seen = gr.State(None)

    # ---- 4. History -----------------------------------------------------------------------------------
    with gr.Accordion("4. History", open=False):
        history_table = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, wrap=True,
                                     elem_id="parley-ft-history")
        with gr.Row():
            run_a = gr.Dropdown(choices=[], label="Run A", allow_custom_value=True, elem_id="parley-ft-run-a")
            run_b = gr.Dropdown(choices=[], label="Run B", allow_custom_value=True, elem_id="parley-ft-run-b")
            overlay_button = gr.Button("Overlay curves and diff settings", elem_id="parley-ft-overlay")
        overlay_plot = gr.LinePlot(x="step", y="value", color="series", title="Loss: A vs B", height=260,
                                   elem_id="parley-ft-overlay-plot")
        diff_table = gr.Dataframe(headers=["Setting", "A", "B"], value=[], interactive=False,
                                  elem_id="parley-ft-diff")
        with gr.Row():
            delete_pick = gr.Dropdown(choices=[], label="Run to delete", allow_custom_value=True,
                                      elem_id="parley-ft-delete-pick")
            delete_button = gr.Button("Delete run…", variant="stop", elem_id="parley-ft-delete")
            delete_confirm = gr.Button("Yes, delete its files", variant="stop", visible=False,
                                       elem_id="parley-ft-delete-confirm")
        delete_status = gr.Markdown("", elem_id="parley-ft-delete-status")
    timer = gr.Timer(2.0)

    # ---- data handlers ----------------------------------------------------------------------------------
    def on_source(choice):
        return (gr.update(visible=choice == UPLOAD), gr.update(visible=choice == HOME_FILE),
                gr.update(choices=training_data.data_files(home)) if choice == HOME_FILE else gr.update(),
                gr.update(value=SFT_DPO if choice == CHAT else SFT))

    source.change(on_source, source, [upload, home_row, home_file, recipe], api_name=False)
    home_refresh.click(lambda: gr.update(choices=training_data.data_files(home)), None, home_file, api_name=False)

    def kinds_of(recipe_value: str) -> list[str]:
        return {"sft": ["sft"], "dpo": ["dpo"], "sft+dpo": ["sft", "dpo"]}[RECIPE_KIND[recipe_value]]

    def sources(source_value, path, recipe_value) -> dict[str, str]:
        """kind -> the data it trains on: a file, "feedback" or "preferences"."""
        kinds = kinds_of(recipe_value)
        if source_value == CHAT:
            return {k: training_data.FEEDBACK if k == "sft" else training_data.PREFERENCES for k in kinds}
        if not path:
            raise gr.Error("Upload a file or pick one under PARLEY_HOME first.")
        if len(kinds) > 1:
            raise gr.Error("SFT then DPO needs conversations and pairs: use the chat's feedback and votes, or run "
                           "SFT on your file first and DPO on a pairs file after it.")
        return {kinds[0]: path}

    def show_preview(source_value, path, recipe_value, *settings_values):
        lora_settings = changed_settings(lora_spec, list(settings_values[:len(lora_spec)]))
        dpo_settings = changed_settings(dpo_spec, list(settings_values[len(lora_spec):]))
        data = sources(source_value, path, recipe_value)
        kind, where = next(iter(data.items()))
        max_length = (lora_settings if kind == "sft" else dpo_settings).get("max_length", 1024)
        try:
            preview = training_data.preview(where, tokenizer(), home=home, kind=kind, max_length=int(max_length),
                                            fmt=lora_settings.get("format", "auto"))
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        note = f"  \n(previewing the {kind.upper()} data; the DPO pairs are checked when that stage starts)" \
            if len(data) > 1 else ""
        rejects = "\n".join(preview.reject_lines[:500]) or "none"
        if len(preview.rejects) > 500:
            rejects += f"\n... and {len(preview.rejects) - 500} more"
        return (preview_summary(preview) + note, preview_html(preview), length_histogram(preview.lengths), rejects)

    preview_outputs = [data_summary, preview_box, lengths_plot, rejects_box]
    all_settings = [*lora_inputs, *dpo_inputs]

    def guarded_preview(source_value, path, recipe_value, browser_id, *values, request: gr.Request = None):
        admin(request, browser_id, "Previewing training data")
        return show_preview(source_value, path, recipe_value, *values)

    def on_upload(file, source_value, recipe_value, browser_id, *values, request: gr.Request = None):
        admin(request, browser_id, "Uploading training data")
        if not file:
            return ("", *[gr.update()] * 4)
        path = Path(file if isinstance(file, str) else getattr(file, "name", file))
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            path.unlink(missing_ok=True)
            raise gr.Error(f"{path.name} is {size / 1e9:.1f} GB, above the {MAX_UPLOAD_BYTES / 1e9:.0f} GB upload "
                           f"limit for training data: copy it under PARLEY_HOME ({home}) and pick it from the list")
        target_dir = home / "uploads" / "training"
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{path.name}"
        shutil.copyfile(path, target)  # Gradio's temporary copy may be cleaned up before the run reads it
        return (str(target), *show_preview(source_value, str(target), recipe_value, *values))

    upload.upload(on_upload, [upload, source, recipe, session.browser_id, *all_settings],
                  [data_path, *preview_outputs], api_name=False)

    def on_home_file(relative, source_value, recipe_value, browser_id, *values, request: gr.Request = None):
        admin(request, browser_id, "Reading training data")
        if not relative:
            return ("", *[gr.update()] * 4)
        try:
            path = str(training_data.resolve_under_home(home, relative))
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        return (path, *show_preview(source_value, path, recipe_value, *values))

    home_file.input(on_home_file, [home_file, source, recipe, session.browser_id, *all_settings],
                    [data_path, *preview_outputs], api_name=False)
    preview_button.click(guarded_preview, [source, data_path, recipe, session.browser_id, *all_settings],
                         preview_outputs, api_name=False)

    def apply_preset(name):
        lora = PRESETS[name]
        dpo = DPO_PRESETS[name]
        return ([gr.update(value=lora[n]) if n in lora else gr.update() for n, *_ in lora_spec]
                + [gr.update(value=dpo[n]) if n in dpo else gr.update() for n, *_ in dpo_spec])

    preset.change(apply_preset, preset, all_settings, api_name=False)

    def on_recipe(recipe_value):
        kinds = kinds_of(recipe_value)
        return gr.update(visible="sft" in kinds), gr.update(visible="dpo" in kinds)

    recipe.change(on_recipe, recipe, [lora_box, dpo_box], api_name=False)

    # ---- start / estimate ---------------------------------------------------------------------------------
    def job_args(source_value, path, recipe_value, values) -> dict[str, Any]:
        data = sources(source_value, path, recipe_value)
        lora_settings = changed_settings(lora_spec, list(values[:len(lora_spec)]))
        dpo_settings = changed_settings(dpo_spec, list(values[len(lora_spec):]))
        if "sft" not in data:
            lora_settings = {}
        return {"kind": RECIPE_KIND[recipe_value], "data": data.get("sft", training_data.FEEDBACK),
                "dpo_data": data.get("dpo", training_data.PREFERENCES), "settings": lora_settings,
                "dpo_settings": dpo_settings if "dpo" in data else {}}

    def start(name, source_value, path, recipe_value, browser_id, *values, request: gr.Request = None):
        admin(request, browser_id)
        args = job_args(source_value, path, recipe_value, values)
        name = (name or "").strip() or time.strftime("run-%Y%m%d-%H%M%S")
        try:
            job = jobs.start(name, **args)
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        return gr.update(choices=run_names(), value=job.name), None

    start_button.click(start, [run_name, source, data_path, recipe, session.browser_id, *all_settings],
                       [run_picker, seen], api_name=False)

    def estimate(source_value, path, recipe_value, browser_id, *values, request: gr.Request = None,
                 progress=gr.Progress()):
        admin(request, browser_id, "The pre-flight estimate")
        args = job_args(source_value, path, recipe_value, values)
        out = []
        for kind in kinds_of(recipe_value):
            progress(None, desc=f"measuring a few {kind.upper()} steps on this machine…")
            data = args["data"] if kind == "sft" else args["dpo_data"]
            settings = args["settings"] if kind == "sft" else args["dpo_settings"]
            try:
                out.append(jobs.estimate(kind=kind, data=data, settings=settings))
            except ParleyError as exc:
                raise gr.Error(str(exc)) from None
        return estimate_text(out)

    estimate_button.click(estimate, [source, data_path, recipe, session.browser_id, *all_settings], estimate_box,
                          api_name=False)

    def quick_train(browser_id, request: gr.Request = None):
        admin(request, browser_id)
        counts = training_data.chat_data_counts(runtime.store)
        if not counts["feedback"] and not counts["pairs"]:
            raise gr.Error("No feedback or votes yet: rate replies with 👍, write corrections in the chat, or vote "
                           "in Compare, then train.")
        kind = "sft+dpo" if counts["feedback"] and counts["pairs"] else ("sft" if counts["feedback"] else "dpo")
        name = time.strftime("feedback-%Y%m%d-%H%M%S")
        try:
            job = jobs.start(name, kind=kind, data=training_data.FEEDBACK, dpo_data=training_data.PREFERENCES,
                             settings=dict(PRESETS["quick"]), dpo_settings=dict(DPO_PRESETS["quick"]))
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        text = (f"Started **{job.name}** ({kind}) on {counts['feedback']} rated or corrected replies and "
                f"{counts['pairs']} preference pairs: watch it under 3. Run.")
        return text, gr.update(choices=run_names(), value=job.name), None

    quick_button.click(quick_train, session.browser_id, [quick_info, run_picker, seen], api_name=False)

    # ---- the cockpit: a timer re-reads the run folder -------------------------------------------------------
    cockpit = [run_status, loss_plot, lr_plot, tokens_plot, memory_plot, margin_plot, run_log, stop_button,
               cancel_button, resume_button, chat_button, compare_button, run_picker, history_table, seen]

    def current_run(picked: str | None) -> str | None:
        if picked and picked in jobs.jobs:
            return picked
        running = jobs.running()
        if running:
            return running.name
        history = jobs.history()
        return history[0]["name"] if history else None

    def refresh(picked, last_seen, browser_id, request: gr.Request = None):
        skip = [gr.skip()] * len(cockpit)
        try:
            identity = session.identity(request, browser_id)
        except gr.Error:
            return skip
        if not identity.admin:
            return skip
        name = current_run(picked)
        if name is None:
            return skip if last_seen == "none" else [
                "No run yet: bring data and press Start, or train from the chat's votes and feedback.",
                *[gr.skip()] * 6, *[gr.update(visible=False)] * 5, gr.update(choices=[]), [], "none"]
        job = jobs.get(name)
        signature = repr((name, job.status, job.stop_requested, jobs.revision(name), len(jobs.jobs)))
        if signature == last_seen:
            return skip
        progress = jobs.progress(name)
        frames = curve_frames(jobs.metrics(name), jobs.resources(name))
        usable = jobs.usable_adapters(name)
        history = jobs.history()
        running = job.status == "running"
        return [status_text(job, progress), frames["loss"], frames["lr"], frames["tokens"], frames["memory"],
                gr.update(value=frames["margin"], visible=not frames["margin"].empty), job.tail(40),
                gr.update(visible=running and not job.stop_requested), gr.update(visible=running),
                gr.update(visible=not running and any(h["name"] == name and h["resumable"] for h in history)),
                gr.update(visible=bool(usable) and not running), gr.update(visible=bool(usable) and not running),
                gr.update(choices=[h["name"] for h in history], value=name), history_rows(history), signature]

    timer.tick(refresh, [run_picker, seen, session.browser_id], cockpit, show_progress="hidden", api_name=False)
    run_picker.input(lambda: None, None, seen, api_name=False)

    def control(action: str):
        def handler(picked, browser_id, request: gr.Request = None):
            admin(request, browser_id)
            name = current_run(picked)
            if not name:
                raise gr.Error("No run selected.")
            try:
                getattr(jobs, action)(name)
            except ParleyError as exc:
                raise gr.Error(str(exc)) from None
            return None
        return handler

    for button, action in ((stop_button, "stop"), (cancel_button, "cancel"), (resume_button, "resume")):
        button.click(control(action), [run_picker, session.browser_id], seen, api_name=False)

    def chat_with(picked, browser_id, request: gr.Request = None):
        admin(request, browser_id, "Switching the chat to a new adapter")
        name = current_run(picked)
        usable = jobs.usable_adapters(name) if name else []
        if not usable:
            raise gr.Error("This run has no adapter the chat can use yet.")
        return gr.update(choices=adapter_choices(), value=usable[0])

    chat_button.click(chat_with, [run_picker, session.browser_id], adapter, api_name=False).then(
        None, None, None, js=f"() => ({TAB_SWITCH_JS})('Chat')")

    def compare_with_base(picked, browser_id, request: gr.Request = None):
        admin(request, browser_id, "Comparing adapters")
        name = current_run(picked)
        usable = jobs.usable_adapters(name) if name else []
        if not usable:
            raise gr.Error("This run has no adapter to compare yet.")
        return {"a": BASE, "b": usable[0], "run": name, "requested_at": time.time()}

    compare_button.click(compare_with_base, [run_picker, session.browser_id], compare_request, api_name=False).then(
        None, None, None, js=f"() => ({TAB_SWITCH_JS})('Compare')")

    # ---- history: overlay, diff, delete -----------------------------------------------------------------------
    def overlay(a, b, browser_id, request: gr.Request = None):
        import pandas as pd

        admin(request, browser_id, "Reading training runs")
        frames, rows = [], []
        for label, name in (("A", a), ("B", b)):
            if not name:
                continue
            if name not in jobs.jobs:
                raise gr.Error(f"no run named {name!r}")
            loss = curve_frames(jobs.metrics(name), prefix=f"{label} {name}: ")["loss"]
            frames.append(loss[~loss["series"].str.endswith("(raw)")])
        if a in jobs.jobs and b in jobs.jobs:
            rows = settings_diff(jobs.effective_settings(a), jobs.effective_settings(b))
        return (pd.concat(frames) if frames else pd.DataFrame(columns=["step", "value", "series"])), rows

    overlay_button.click(overlay, [run_a, run_b, session.browser_id], [overlay_plot, diff_table], api_name=False)

    def history_choices(_rows):
        names = run_names()
        return gr.update(choices=names), gr.update(choices=names), gr.update(choices=names)

    history_table.change(history_choices, history_table, [run_a, run_b, delete_pick], api_name=False)

    def ask_delete(name, browser_id, request: gr.Request = None):
        admin(request, browser_id, "Deleting a run")
        if not name or name not in jobs.jobs:
            raise gr.Error("Pick a run to delete.")
        return (gr.update(visible=True),
                f"Delete run **{name}**: its run folder and its adapter files ({', '.join(_stage_names(jobs, name))})? "
                f"Other runs are not touched.")

    def do_delete(name, browser_id, request: gr.Request = None):
        admin(request, browser_id, "Deleting a run")
        try:
            jobs.delete(name)
        except ParleyError as exc:
            raise gr.Error(str(exc)) from None
        names = run_names()
        return (gr.update(visible=False), f"Deleted **{name}**.", gr.update(choices=names, value=None),
                gr.update(choices=adapter_choices()), None, gr.update(choices=names, value=None))

    delete_button.click(ask_delete, [delete_pick, session.browser_id], [delete_confirm, delete_status], api_name=False)
    delete_confirm.click(do_delete, [delete_pick, session.browser_id],
                         [delete_confirm, delete_status, delete_pick, adapter, seen, run_picker], api_name=False)
    return TrainingTab(compare_request=compare_request)


def _stage_names(jobs, name: str) -> list[str]:
    return [s.get("name", name) for s in jobs.get(name).spec.get("stages", [])] or [name]


def _settings_accordion(title: str, spec, preset: dict[str, Any], prefix: str, visible: bool):
    """One input per config field (type from the dataclass, help text from its docstring)."""
    inputs = []
    with gr.Accordion(title, open=False, visible=visible, elem_id=f"parley-ft-{prefix}-settings") as box:
        for start in range(0, len(spec), 3):
            with gr.Row():
                for name, kind, default, doc in spec[start:start + 3]:
                    value = preset.get(name, default)
                    common = {"label": name, "info": doc, "elem_id": f"parley-ft-{prefix}-{name}"}
                    if kind is bool:
                        inputs.append(gr.Checkbox(value=bool(value), **common))
                    elif kind is int:
                        inputs.append(gr.Number(value=value, precision=0, **common))
                    elif kind is float:
                        inputs.append(gr.Number(value=value, **common))
                    elif name in CHOICES:
                        inputs.append(gr.Dropdown(choices=list(CHOICES[name]), value=value, **common))
                    else:
                        inputs.append(gr.Textbox(value=str(value), **common))
    return box, inputs

