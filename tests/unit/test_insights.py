"""Training vs inference (bot/insights.py, ui/insights.py): aggregates from stored turns and adapter
records, read-only, and the tab's table, headline and time-scale plot."""

from __future__ import annotations

import json

import pytest

from bot import insights
from bot.store import Store


def _turn(store, cid, adapter, ttft, tps, tokens, finish="stop"):
    tid = store.begin_turn(cid, messages=[{"role": "user", "content": "hi"}], model="m", adapter=adapter)
    store.finish_turn(tid, reply="ok", finish_reason=finish,
                      usage={"prompt_tokens": 5, "completion_tokens": tokens, "time_to_first_token_s": ttft,
                             "tokens_per_second": tps, "total_time_s": ttft + tokens / max(tps, 1)})


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "parley.db")
    cid = store.create_conversation(owner="browser:x")
    for i in range(1, 21):  # base: 20 replies, first token at 10..200 ms
        _turn(store, cid, "base", i / 100, 20.0 + i, 10)
    for ttft in (0.05, 0.07, 0.09):
        _turn(store, cid, "tuned", ttft, 30.0, 8)
    _turn(store, cid, "tuned", 0.5, 0.0, 1)            # one token: no decode rate
    _turn(store, cid, "tuned", 9.0, 1.0, 3, "error")   # failed: not served
    store.begin_turn(cid, messages=[{"role": "user", "content": "still going"}], model="m", adapter="tuned")
    return store


def test_inference_aggregates_per_adapter(store):
    before = store.path.stat().st_mtime_ns, store.path.stat().st_size
    stats = insights.inference_by_adapter(store.path)
    assert (store.path.stat().st_mtime_ns, store.path.stat().st_size) == before  # read-only
    base, tuned = stats["base"], stats["tuned"]
    assert base["requests"] == 20 and base["completion_tokens"] == 200
    assert base["ttft_p50_ms"] == 100.0 and base["ttft_p95_ms"] == 190.0  # nearest rank
    assert base["decode_tokens_per_s"] == 30.0
    assert tuned["requests"] == 4 and tuned["failed"] == 1  # the running turn is neither
    assert tuned["ttft_p50_ms"] == 70.0 and tuned["decode_tokens_per_s"] == 30.0
    assert insights.inference_by_adapter(store.path.with_name("missing.db")) == {}
    assert insights.percentile([], 50) is None and insights.percentile([3.0], 95) == 3.0


def _adapter(home, name, kind="lora", **metrics):
    folder = home / "adapters" / name
    folder.mkdir(parents=True)
    stats = {"train": {"rows": 38}, "eval": {"rows": 2}} if kind == "lora" else {"train_pairs": 90, "eval_pairs": 10}
    (folder / "parley_adapter.json").write_text(json.dumps({
        "kind": kind, "device": "cpu", "data_stats": stats, "created_at": "2026-01-01T00:00:00Z",
        "metrics": {"tokens": 12000, "total_seconds": 5400.0, "tokens_per_s": 2.5, "peak_memory_mb": 1900.0,
                    "eval_loss": 1.25, "step": 30, **metrics}}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 2 ** 20)
    return folder


def test_training_facts_and_the_table(tmp_path, store):
    from ui.insights import headline, human_time, scale_points, table_rows

    home = tmp_path
    _adapter(home, "tuned")
    _adapter(home, "prefs", kind="dpo", eval_reward_margin=0.8)
    (home / "adapters" / "broken").mkdir()
    rows = insights.adapter_table(home, store.path, loaded={"tuned": str(home / "adapters" / "tuned")},
                                  inference_device="transformers on cpu")
    assert [r["adapter"] for r in rows] == ["base", "prefs", "tuned"]
    tuned = next(r for r in rows if r["adapter"] == "tuned")
    assert tuned["training"]["rows"] == 38 and tuned["training"]["wall_s"] == 5400.0
    assert tuned["training"]["adapter_mb"] == 1.0 and tuned["inference"]["requests"] == 4
    assert tuned["inference"]["device"] == "transformers on cpu" and tuned["loaded"]
    prefs = next(r for r in rows if r["adapter"] == "prefs")
    assert prefs["training"]["rows"] == 90 and prefs["training"]["reward_margin"] == 0.8 and prefs["inference"] is None
    table = table_rows(rows)
    assert table[2][:10] == ["tuned", "lora", "38", "12,000", "1.5 h", "2", "1,900 MB", "cpu", "1.2500", "4"]
    assert table[2][10] == "70 ms" and table[0][1] == "—"
    points = scale_points(rows)
    assert ("tuned: training run", 5400.0, "training") in points
    assert any(label == "tuned: first token (p50)" and value == pytest.approx(0.07) for label, value, _ in points)
    assert "77,143" in headline(rows)  # 5,400 s / 70 ms
    assert [human_time(s) for s in (0.0123, 4.2, 150, 7200)] == ["12 ms", "4.2 s", "2.5 min", "2.0 h"]


def test_the_scale_figure_draws_on_a_log_axis(tmp_path, store):
    from ui.insights import scale_figure, scale_points

    _adapter(tmp_path, "tuned")
    fig = scale_figure(scale_points(insights.adapter_table(tmp_path, store.path)))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.patches) == 5  # training + first token + reply, twice for base
    assert "1.5 h" in [t.get_text() for t in ax.texts]
    empty = scale_figure([])
    assert empty.axes[0].texts[0].get_text().startswith("No trained")
