"""The "Training vs inference" tab: per adapter, what training it cost next to how fast it answers.

The table is this deployment's own records, not a benchmark: training from each adapter's
parley_adapter.json, inference from the turns the store saved with their timings
(bot/insights.py, read-only). The plot puts both on one logarithmic time axis, because training
is measured in minutes or hours and answering in milliseconds.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from bot import insights
from bot.runtime import Runtime
from ui.session import Session

HEADERS = ["Adapter", "Recipe", "Rows", "Tokens trained", "Training time", "Training tokens/s", "Peak memory",
           "Trained on", "Final eval loss", "Requests", "First token p50", "First token p95", "Decode tokens/s",
           "Adapter size", "Serving on"]


def human_time(seconds: float | None) -> str:
    """Seconds in the unit a person reads at a glance: ms, s, min or h."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else ""


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        t, i = row["training"] or {}, row["inference"] or {}
        out.append([row["adapter"], t.get("kind", "—" if row["adapter"] == "base" else ""), _num(t.get("rows")),
                    _num(t.get("tokens")), human_time(t.get("wall_s")), _num(t.get("tokens_per_s")),
                    _num(t.get("peak_memory_mb"), "{:,.0f} MB"), t.get("device") or "",
                    _num(t.get("final_eval_loss"), "{:.4f}"), _num(i.get("requests")),
                    human_time((i["ttft_p50_ms"] or 0) / 1000) if i.get("ttft_p50_ms") is not None else "",
                    human_time((i["ttft_p95_ms"] or 0) / 1000) if i.get("ttft_p95_ms") is not None else "",
                    _num(i.get("decode_tokens_per_s"), "{:,.1f}"), _num(t.get("adapter_mb"), "{:,.2f} MB"),
                    i.get("device") or ""])
    return out


def scale_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, str]]:
    """(label, seconds, kind) bars for the time-scale plot: each adapter's training wall time, its
    time to first token (p50) and a typical reply (first token + its median length at its decode rate)."""
    points = []
    for row in rows:
        t, i = row["training"] or {}, row["inference"] or {}
        name = row["adapter"]
        if t.get("wall_s"):
            points.append((f"{name}: training run", float(t["wall_s"]), "training"))
        if i.get("ttft_p50_ms") is not None:
            ttft = i["ttft_p50_ms"] / 1000
            points.append((f"{name}: first token (p50)", max(ttft, 1e-4), "inference"))
            if i.get("decode_tokens_per_s") and i.get("requests"):
                tokens = i["completion_tokens"] / i["requests"]
                points.append((f"{name}: a whole reply ({tokens:.0f} tokens)", ttft + tokens / i["decode_tokens_per_s"],
                               "inference"))
    return points


def scale_figure(points: list[tuple[str, float, str]]):
    """Horizontal bars on a log axis, each labelled in its own unit (ms, s, min, h)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * max(3, len(points)) + 1.2), dpi=100)
    if not points:
        ax.text(0.5, 0.5, "No trained or served adapter yet", ha="center", va="center")
        ax.axis("off")
        return fig
    labels = [p[0] for p in points][::-1]
    values = [p[1] for p in points][::-1]
    colors = ["#f97316" if p[2] == "training" else "#2563eb" for p in points][::-1]
    ax.barh(labels, values, color=colors)
    ax.set_xscale("log")
    for y, v in enumerate(values):
        ax.text(v * 1.15, y, human_time(v), va="center", fontsize=9)
    ticks = [t for t in (0.001, 0.01, 0.1, 1, 10, 60, 600, 3600, 36000) if min(values) / 10 <= t <= max(values) * 10]
    ax.set_xticks(ticks)
    ax.set_xticklabels([human_time(t) for t in ticks])
    ax.set_xlim(min(values) / 3, max(values) * 8)
    ax.set_title("Training takes minutes to hours; answering takes milliseconds (log scale)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def headline(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        t, i = row["training"] or {}, row["inference"] or {}
        if t.get("wall_s") and i.get("ttft_p50_ms"):
            ratio = t["wall_s"] / (i["ttft_p50_ms"] / 1000)
            lines.append(f"**{row['adapter']}**: one training run ({human_time(t['wall_s'])} on {t.get('device') or '?'}) "
                         f"lasts as long as **{ratio:,.0f}** waits for a first token ({human_time(i['ttft_p50_ms'] / 1000)} "
                         f"p50 over {i['requests']} requests).")
    return "  \n".join(lines) or "Train an adapter and chat with it: its row and its scale appear here."


def build_insights_tab(runtime: Runtime, session: Session) -> None:
    """Call inside ``with gr.Tab("Training vs inference"):``."""
    engine = runtime.engine

    def device() -> str:
        where = getattr(engine, "device", None)
        return f"{getattr(engine, 'backend', 'engine')} on {where}" if where is not None else getattr(engine, "backend", "")

    def collect():
        rows = insights.adapter_table(runtime.settings.home, runtime.store.path, loaded=dict(engine.adapters),
                                      inference_device=device())
        return table_rows(rows), scale_figure(scale_points(rows)), headline(rows)

    gr.Markdown("This deployment's own numbers, per adapter: what training it cost (from the adapter's "
                "record of its run) next to how it serves (from the chat turns stored with their timings).")
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="parley-insights-refresh", scale=0)
    table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, elem_id="parley-insights-table")
    summary = gr.Markdown("", elem_id="parley-insights-summary")
    plot = gr.Plot(label="Two time scales", elem_id="parley-insights-plot")
    timer = gr.Timer(15.0)
    outputs = [table, plot, summary]
    refresh.click(collect, None, outputs, api_name=False)
    timer.tick(collect, None, outputs, show_progress="hidden", api_name=False)
    # The first view: the tab the builder was called in loads its numbers when it is opened.
    from gradio.context import Context

    tab = Context.block
    if isinstance(tab, gr.Tab):
        tab.select(collect, None, outputs, api_name=False)
