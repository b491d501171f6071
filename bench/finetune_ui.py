"""The Fine-tune tab's path, measured on SmolLM2-135M on this machine: the pre-flight estimate against
the real run, a 30-step SFT job (time, tokens/s, eval loss before and after), the page-load time of
each tab, and a DPO job on 100 pairs built from GSM8K (chosen = the reference answer, rejected =
the base model's own answer) with its reward margin and exact-answer wins over the base.

    python bench/finetune_ui.py                       # all of it (tens of minutes on 2 CPU cores)
    python bench/finetune_ui.py --skip-dpo --skip-pages
    python bench/finetune_ui.py --home /tmp/bench-home  # reuse a PARLEY_HOME with the converted model

Everything goes through what the browser uses: ``TrainingJobs.estimate`` and ``TrainingJobs.start``
(a background runner process at the lowest CPU priority running ``parley finetune lora|dpo``), with
the tab's own presets (ui/training.py). Prints a table and writes bench/results/finetune_ui.json.
Not a test: it never fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
GSM8K = Path(os.environ.get("PARLEY_DATA", "/work/shared/data")) / "instruct" / "gsm8k_train.messages.jsonl"


def gsm8k_rows(start: int, n: int) -> list[dict]:
    rows = []
    with open(GSM8K) as fh:
        for i, line in enumerate(fh):
            if i >= start:
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def final_number(text: str) -> str | None:
    """The answer GSM8K grades: the number after ####, else the last number in the reply."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    nums = [m.group(1)] if m else re.findall(r"-?\d[\d,]*\.?\d*", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def answers(engine, questions: list[str], adapter: str, max_new_tokens: int, workers: int = 8) -> list[str]:
    """Greedy replies, several requests at once (the engine batches them, as it does for a chat)."""
    from bot.engine import GenerationParams

    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out: list[str] = [""] * len(questions)
    todo = list(enumerate(questions))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if not todo:
                    return
                i, q = todo.pop(0)
            out[i] = engine.generate([{"role": "user", "content": q}], params, adapter=adapter)[0]

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def wait(jobs, name: str) -> dict:
    job = jobs.wait(name)
    facts = json.loads((jobs.adapter_dir(name) / "parley_adapter.json").read_text()) if job.status == "succeeded" else {}
    return {"status": job.status, "error": job.error, "wall_s": round(job.spec.get("active_s") or 0, 1),
            "metrics": facts.get("metrics", {}), "device": facts.get("device")}


def bench_sft(runtime, args) -> dict:
    from ui.training import PRESETS

    jobs = runtime.jobs
    data = Path(runtime.settings.home) / "uploads" / "training" / "gsm8k-400.messages.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(0, 400)))
    settings = {**PRESETS["quick"], "threads": args.threads} if args.threads else dict(PRESETS["quick"])
    started = time.time()
    estimate = jobs.estimate(kind="sft", data=str(data), settings=settings)
    estimate["measured_in_s"] = round(time.time() - started, 1)
    print(f"pre-flight: {estimate}", flush=True)
    jobs.start("bench-sft", kind="sft", data=str(data), settings=settings)
    result = wait(jobs, "bench-sft")
    m = result["metrics"]
    return {"data": "GSM8K train rows 0-399 (5% held out for eval)", "preset": "quick", "settings": settings,
            "estimate": estimate, **result,
            "summary": {"steps": m.get("step"), "job_wall_s": result["wall_s"], "train_step_s": m.get("step_seconds"),
                        "tokens_per_s": m.get("tokens_per_s"), "trained_tokens_per_s": m.get("trained_tokens_per_s"),
                        "eval_loss_before": m.get("initial_eval_loss"), "eval_loss_after": m.get("eval_loss"),
                        "peak_memory_mb": m.get("peak_memory_mb"), "estimated_total_s": estimate["total_s"]}}


def bench_pages(runtime, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    from bot.api import create_app
    from tests.browser import launch
    from tests.helpers import running_server

    # What says each tab has drawn its content (the Fine-tune tab: its first refresh from the run folders).
    ready = {"Chat": "#parley-input textarea", "Documents": "#parley-doc-files",
             "Fine-tune": "#parley-ft-run-status:has-text('bench')", "Compare": "#parley-tab-compare",
             "Training vs inference": "#parley-insights-table"}
    times: dict[str, list[float]] = {}
    with running_server(create_app(runtime)) as url, sync_playwright() as p:
        browser = launch(p)
        for _ in range(repeats):
            page = browser.new_context().new_page()
            page.set_default_timeout(120_000)
            t = time.perf_counter()
            page.goto(url + "/")
            page.locator(ready["Chat"]).wait_for(state="visible")
            times.setdefault("page (Chat first)", []).append(time.perf_counter() - t)
            for tab, selector in ready.items():
                if tab == "Chat" or not page.get_by_role("tab", name=tab).count():
                    continue
                t = time.perf_counter()
                page.get_by_role("tab", name=tab).click()
                page.locator(selector).first.wait_for(state="visible")
                times.setdefault(tab, []).append(time.perf_counter() - t)
            page.context.close()
        browser.close()
    return {tab: {"median_ms": round(1000 * statistics.median(v), 1), "runs": len(v)} for tab, v in times.items()}


def bench_dpo(runtime, args) -> dict:
    from ui.training import DPO_PRESETS

    engine, jobs = runtime.engine, runtime.jobs
    rows = gsm8k_rows(1000, 100)
    questions = [r["messages"][0]["content"] for r in rows]
    t = time.time()
    base = answers(engine, questions, "base", args.max_new_tokens)
    gen_s = time.time() - t
    correct = sum(final_number(a) == r["final_answer"] for a, r in zip(base, rows))
    pairs = Path(runtime.settings.home) / "uploads" / "training" / "gsm8k-100.pairs.jsonl"
    with open(pairs, "w") as fh:
        for r, a in zip(rows, base):
            fh.write(json.dumps({"prompt": r["messages"][:1], "chosen": r["messages"][1]["content"],
                                 "rejected": a or "(no answer)", "id": r["id"]}) + "\n")
    settings = {**DPO_PRESETS["quick"], "max_steps": 0, "epochs": 1}
    if args.threads:
        settings["threads"] = args.threads
    jobs.start("bench-dpo", kind="dpo", dpo_data=str(pairs), dpo_settings=settings)
    result = wait(jobs, "bench-dpo")
    m = result["metrics"]
    out = {"pairs": 100, "base_answers_correct": correct, "base_generation_s": round(gen_s, 1),
           "settings": settings, **result,
           "summary": {"steps": m.get("step"), "job_wall_s": result["wall_s"], "tokens_per_s": m.get("tokens_per_s"),
                       "reward_margin_before": m.get("initial_reward_margin"),
                       "reward_margin_after": m.get("eval_reward_margin"),
                       "reward_accuracy_after": m.get("eval_reward_accuracy"),
                       "eval_loss_before": m.get("initial_eval_loss"), "eval_loss_after": m.get("eval_loss")}}
    if result["status"] == "succeeded" and args.heldout:
        held = gsm8k_rows(2000, args.heldout)
        qs = [r["messages"][0]["content"] for r in held]
        a_base = answers(engine, qs, "base", args.max_new_tokens)
        a_dpo = answers(engine, qs, "bench-dpo", args.max_new_tokens)
        ok_base = [final_number(a) == r["final_answer"] for a, r in zip(a_base, held)]
        ok_dpo = [final_number(a) == r["final_answer"] for a, r in zip(a_dpo, held)]
        wins = sum(d and not b for b, d in zip(ok_base, ok_dpo))
        losses = sum(b and not d for b, d in zip(ok_base, ok_dpo))
        out["heldout"] = {"questions": len(held), "base_correct": sum(ok_base), "dpo_correct": sum(ok_dpo),
                          "dpo_wins": wins, "base_wins": losses, "ties": len(held) - wins - losses,
                          "dpo_win_rate_excluding_ties": round(wins / (wins + losses), 3) if wins + losses else None}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="PARLEY_HOME to use (default: a fresh temporary one)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the training jobs (0: all cores)")
    p.add_argument("--page-repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=192, help="length of the base model's answers")
    p.add_argument("--heldout", type=int, default=30, help="held-out GSM8K questions, base vs DPO adapter")
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--skip-pages", action="store_true")
    p.add_argument("--skip-dpo", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_ui.json"))
    args = p.parse_args()

    from bot.config import Settings
    from bot.runtime import build_runtime

    home = Path(args.home or tempfile.mkdtemp(prefix="parley-bench-ft-"))
    t = time.time()
    runtime = build_runtime(Settings(home=home, model=args.model), progress=False)
    results: dict = {"model": args.model, "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
                     "runtime_load_s": round(time.time() - t, 1), "home": str(home)}
    try:
        if not args.skip_sft:
            results["sft"] = bench_sft(runtime, args)
            print("sft:", json.dumps(results["sft"]["summary"]), flush=True)
        if not args.skip_pages:
            results["page_load"] = bench_pages(runtime, args.page_repeats)
            print("pages:", json.dumps(results["page_load"]), flush=True)
        if not args.skip_dpo:
            results["dpo"] = bench_dpo(runtime, args)
            print("dpo:", json.dumps(results["dpo"]["summary"]), json.dumps(results["dpo"].get("heldout")), flush=True)
    finally:
        runtime.engine.close()
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    print(f"\n{'measure':<46} value")
    print("-" * 70)
    if "sft" in results:
        s = results["sft"]["summary"]
        for key in ("steps", "estimated_total_s", "job_wall_s", "train_step_s", "tokens_per_s", "eval_loss_before",
                    "eval_loss_after", "peak_memory_mb"):
            print(f"{'SFT (30 steps, quick preset) ' + key:<46} {s.get(key)}")
    for tab, v in (results.get("page_load") or {}).items():
        print(f"{'page load: ' + tab:<46} {v['median_ms']} ms (median of {v['runs']})")
    if "dpo" in results:
        s = results["dpo"]["summary"]
        for key, value in s.items():
            print(f"{'DPO (100 GSM8K pairs) ' + key:<46} {value}")
        print(f"{'DPO base answers correct (of 100)':<46} {results['dpo']['base_answers_correct']}")
        for key, value in (results["dpo"].get("heldout") or {}).items():
            print(f"{'held-out GSM8K ' + key:<46} {value}")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
