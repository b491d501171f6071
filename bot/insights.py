"""Training vs inference, per adapter, from this deployment's own records (read-only).

Training facts come from each adapter's ``parley_adapter.json`` (written by the recipes at the end
of a run: rows, tokens, wall time, tokens/s, peak memory, device, eval loss). Inference facts come
from the turns the store saved with their timings (``turns.usage``: time to first token, decode
tokens/s, completion tokens), aggregated here with one read-only query: this module never writes
to the store.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

SERVED = ("stop", "length", "cancelled", "tool_calls")
"""Finish reasons of a turn that produced a reply (errors, interrupted and running turns are not served)."""


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def inference_by_adapter(db_path: str | Path) -> dict[str, dict[str, Any]]:
    """Per adapter (``base`` included): requests served, time to first token p50/p95 (ms), decode
    tokens/s (median over replies of more than one token), tokens generated, first/last use."""
    path = Path(db_path)
    if not path.is_file():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT adapter, model, usage, finish_reason, created_at FROM turns").fetchall()
    except sqlite3.OperationalError:  # no turns table yet
        return {}
    finally:
        conn.close()
    grouped: dict[str, dict[str, Any]] = {}
    for adapter, model, usage, finish, created in rows:
        entry = grouped.setdefault(adapter or "base", {"ttft": [], "tps": [], "served": 0, "failed": 0,
                                                       "completion_tokens": 0, "prompt_tokens": 0,
                                                       "models": set(), "first": created, "last": created})
        if finish not in SERVED:
            entry["failed"] += finish in ("error", "interrupted")
            continue
        try:
            u = json.loads(usage or "{}")
        except ValueError:
            u = {}
        entry["served"] += 1
        entry["models"].add(model)
        entry["first"], entry["last"] = min(entry["first"], created), max(entry["last"], created)
        entry["completion_tokens"] += int(u.get("completion_tokens") or 0)
        entry["prompt_tokens"] += int(u.get("prompt_tokens") or 0)
        if isinstance(u.get("time_to_first_token_s"), (int, float)):
            entry["ttft"].append(float(u["time_to_first_token_s"]))
        if (u.get("completion_tokens") or 0) > 1 and (u.get("tokens_per_second") or 0) > 0:
            entry["tps"].append(float(u["tokens_per_second"]))
    out = {}
    for adapter, e in grouped.items():
        p50, p95 = percentile(e["ttft"], 50), percentile(e["ttft"], 95)
        out[adapter] = {"requests": e["served"], "failed": e["failed"],
                        "ttft_p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                        "ttft_p95_ms": round(p95 * 1000, 1) if p95 is not None else None,
                        "decode_tokens_per_s": round(percentile(e["tps"], 50), 1) if e["tps"] else None,
                        "completion_tokens": e["completion_tokens"], "prompt_tokens": e["prompt_tokens"],
                        "models": sorted(m for m in e["models"] if m), "first_at": e["first"], "last_at": e["last"]}
    return out


def training_of(adapter_dir: str | Path) -> dict[str, Any] | None:
    """What training one adapter cost, from its parley_adapter.json (None when it has none)."""
    folder = Path(adapter_dir)
    try:
        facts = json.loads((folder / "parley_adapter.json").read_text())
    except (OSError, ValueError):
        return None
    metrics = facts.get("metrics") or {}
    stats = facts.get("data_stats") or {}
    rows = (stats.get("train") or {}).get("rows") if isinstance(stats.get("train"), dict) else stats.get("train_pairs")
    weights = folder / "adapter_model.safetensors"
    return {"kind": facts.get("kind", "lora"), "rows": rows, "tokens": metrics.get("tokens"),
            "wall_s": metrics.get("total_seconds"), "step_s": metrics.get("step_seconds"),
            "tokens_per_s": metrics.get("tokens_per_s"), "peak_memory_mb": metrics.get("peak_memory_mb"),
            "device": facts.get("device"), "final_eval_loss": metrics.get("eval_loss"),
            "initial_eval_loss": metrics.get("initial_eval_loss"), "steps": metrics.get("step"),
            "reward_margin": metrics.get("eval_reward_margin"), "stopped_at_step": metrics.get("stopped_at_step"),
            "created_at": facts.get("created_at"),
            "adapter_mb": round(weights.stat().st_size / 2 ** 20, 2) if weights.is_file() else None}


def training_by_adapter(home: str | Path, adapters: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per adapter under PARLEY_HOME/adapters (and any other loaded ones in ``adapters``: name ->
    folder): its training facts."""
    folders: dict[str, Path] = {}
    root = Path(home) / "adapters"
    if root.is_dir():
        folders.update({p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")})
    folders.update({name: Path(path) for name, path in (adapters or {}).items()})
    out = {}
    for name, folder in sorted(folders.items()):
        facts = training_of(folder)
        if facts is not None:
            out[name] = facts
    return out


def adapter_table(home: str | Path, db_path: str | Path, *, loaded: dict[str, str] | None = None,
                  inference_device: str | None = None) -> list[dict[str, Any]]:
    """One row per adapter that was trained or served (base first): its training next to its inference."""
    training = training_by_adapter(home, loaded)
    inference = inference_by_adapter(db_path)
    names = ["base"] + sorted((set(training) | set(inference) | set(loaded or {})) - {"base"})
    rows = []
    for name in names:
        t, i = training.get(name) or {}, inference.get(name) or {}
        rows.append({"adapter": name, "loaded": name == "base" or name in (loaded or {}), "training": t or None,
                     "inference": {**i, "device": inference_device} if i else None})
    return rows
