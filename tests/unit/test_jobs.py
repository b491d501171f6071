"""Training jobs (bot/jobs.py) on the tiny model: the lifecycle (start, Stop and save, Resume,
Cancel, delete), reattaching after a server restart and after a kill -9, SFT then DPO, the
pre-flight estimate, the LoRA recipe's Stop-and-save signal, and the Fine-tune tab's pure helpers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from bot.errors import RequestError
from bot.jobs import TrainingJobs, estimate_from_probe, recent_seconds_per_step
from tests.helpers import build_test_runtime
from tests.unit.finetune_fixtures import one_torch_thread, read_metrics, tiny_lora_config, write_chat_jsonl  # noqa: F401
from tests.unit.test_finetune_dpo import write_pairs

# Tiny steps take milliseconds: many of them, on one thread, leave time to press Stop.
SLOW = {"max_steps": 400, "batch_size": 2, "grad_accum": 1, "rank": 4, "alpha": 8, "learning_rate": 1e-2,
        "max_length": 256, "threads": 1, "eval_every": 100, "save_every": 20, "warmup_ratio": 0.0}
QUICK = {**SLOW, "max_steps": 4, "eval_every": 0, "save_every": 0}


@pytest.fixture(scope="module")
def runtime(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("jobs-home"), max_new_tokens_cap=8)
    yield runtime
    for job in runtime.jobs.jobs.values():  # never leave a training process behind
        if job.status == "running":
            runtime.jobs.cancel(job.name)
            runtime.jobs.wait(job.name, 60)
    runtime.engine.close()


@pytest.fixture(scope="module")
def chat_data(runtime):
    return write_chat_jsonl(Path(runtime.settings.home) / "chat.jsonl", 40)


def wait_for_steps(jobs, name, n, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [r for r in jobs.metrics(name) if "loss" in r]
        if len(steps) >= n:
            return steps
        assert jobs.get(name).status == "running", jobs.get(name).tail(30)
        time.sleep(0.2)
    raise AssertionError(f"{name}: fewer than {n} steps after {timeout} s:\n{jobs.get(name).tail(30)}")


def test_seconds_per_step_and_the_estimate_arithmetic():
    records = [{"step": 1, "loss": 2.0, "elapsed_s": 10.0, "total_steps": 100, "tokens_per_s": 50.0},
               {"step": 2, "loss": 1.9, "elapsed_s": 12.0, "total_steps": 100},
               {"step": 3, "loss": 1.8, "elapsed_s": 14.5, "total_steps": 100},
               {"step": 4, "loss": 1.7, "elapsed_s": 16.5, "total_steps": 100, "tokens_per_s": 80.0}]
    assert recent_seconds_per_step(records) == 2.0  # gaps 2.0, 2.5, 2.0: the median
    assert recent_seconds_per_step(records[:1]) is None
    est = estimate_from_probe(records, peak_rss_mb=1234.5, probe_wall_s=20.0)
    assert est["sec_per_step"] == 2.0 and est["planned_steps"] == 100
    assert est["startup_s"] == 8.0  # the first step's 10 s less one step
    assert est["total_s"] == 8.0 + 200.0 and est["train_s"] == 200.0
    assert est["peak_memory_mb"] == 1234.5 and est["tokens_per_s"] == 80.0
    assert estimate_from_probe(records, planned_steps=10)["total_s"] == 28.0
    with pytest.raises(RequestError):
        estimate_from_probe([{"step": 0, "eval_loss": 1.0}])


def test_lora_stop_and_save_signal_saves_a_usable_adapter_and_resume_finishes(tiny_model_dir, tmp_path,
                                                                              parley_home):
    from bot.models import validate_adapter_dir
    from finetune import lora, runs

    data = write_chat_jsonl(tmp_path / "chat.jsonl", 24)
    out = tmp_path / "stopped"
    cfg = dict(max_steps=8, eval_every=0)

    def stop_at_3(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # what bot/jobs.py sends for "Stop and save"

    result = lora.train_lora(tiny_lora_config(tiny_model_dir, data, out, **cfg), parley_home, on_step=stop_at_3)
    assert result["stopped"] and result["step"] == 3 and result["planned_steps"] == 8
    validate_adapter_dir(out)
    facts = json.loads((out / "parley_adapter.json").read_text())
    assert facts["metrics"]["stopped_at_step"] == 3 and "eval_loss" in facts["metrics"]
    assert [s for s, _ in runs.list_checkpoints(out)] == [3]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is gone with the run
    result = lora.train_lora(tiny_lora_config(tiny_model_dir, data, out, resume=True, **cfg), parley_home)
    assert result["step"] == 8 and not result["stopped"]
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, 9))
    assert all(r["total_steps"] == 8 for r in read_metrics(out) if "loss" in r)


def test_start_stop_and_save_resume_history(runtime, chat_data):
    jobs = runtime.jobs
    job = jobs.start("life", kind="sft", data=str(chat_data), settings=SLOW)
    with pytest.raises(RequestError, match="still running"):
        jobs.start("other", kind="sft", data=str(chat_data), settings=QUICK)
    wait_for_steps(jobs, "life", 3)
    progress = jobs.progress("life")
    assert progress["total_steps"] == 400 and progress["status"] == "running" and progress["sec_per_step"]
    jobs.stop("life")
    jobs.wait("life", 120)
    assert job.status == "stopped", job.tail(30)
    facts = json.loads((jobs.adapter_dir("life") / "parley_adapter.json").read_text())
    stopped_at = facts["metrics"]["stopped_at_step"]
    assert 3 <= stopped_at < 400
    assert runtime.engine.adapters["life"] == str(jobs.adapter_dir("life"))  # the chat serves it at once
    row = next(h for h in jobs.history() if h["name"] == "life")
    assert row["status"] == "stopped" and row["resumable"] and row["usable"] == ["life"]
    assert row["data"] == "chat.jsonl" and row["steps"] == stopped_at and row["final_eval_loss"] is not None
    samples = jobs.resources("life")
    # Memory is sampled while it trains (the first sample may come while Python is still starting).
    assert samples and max(s["rss_mb"] for s in samples) > 50 and all(s["rss_mb"] > 0 for s in samples)

    jobs.resume("life")
    jobs.wait("life", 300)
    assert job.status == "succeeded", job.tail(30)
    steps = [r["step"] for r in jobs.metrics("life") if "loss" in r]
    assert steps == list(range(1, 401))  # continued from the checkpoint: no step twice, none missing
    spec = job.spec
    assert spec["resumes"] == 1 and spec["active_s"] > 0
    assert spec["stages"][0]["last_command"][-1] == "--resume" and "(resumed)" in job.log_path.read_text()
    with pytest.raises(RequestError, match="nothing to resume"):
        jobs.resume("life")


def test_a_restarted_server_reattaches_and_a_killed_runner_is_interrupted(runtime, chat_data):
    jobs = runtime.jobs
    job = jobs.start("reattach", kind="sft", data=str(chat_data), settings={**SLOW, "max_steps": 120})
    wait_for_steps(jobs, "reattach", 2)
    # A new server process reads the run folders: the run is found running, and finished later.
    restarted = TrainingJobs(runtime.engine, runtime.settings.home, runtime.settings.model)
    again = restarted.get("reattach")
    assert again.status == "running" and again.process is None and again.pid == job.pid
    restarted.wait("reattach", 300)
    assert again.status == "succeeded", again.tail(30)
    jobs.wait("reattach", 30)

    victim = jobs.start("killed", kind="sft", data=str(chat_data), settings=SLOW)
    done = len(wait_for_steps(jobs, "killed", 25))  # past the first checkpoint (save_every 20)
    os.killpg(victim.pid, signal.SIGKILL)  # the runner and its trainer, as a power cut would
    jobs.wait("killed", 60)
    assert victim.status == "interrupted"
    restarted = TrainingJobs(runtime.engine, runtime.settings.home, runtime.settings.model)
    assert restarted.get("killed").status == "interrupted"
    assert next(h for h in restarted.history() if h["name"] == "killed")["resumable"]
    restarted.resume("killed")
    # A resumed run goes on from its newest checkpoint; cancelling it keeps what was saved.
    wait_for_steps(restarted, "killed", done + 25)
    restarted.cancel("killed")
    restarted.wait("killed", 60)
    assert restarted.get("killed").status == "cancelled"
    assert "resuming from checkpoint-" in restarted.get("killed").log_path.read_text()


def test_cancel_delete_and_refusals(runtime, chat_data, tmp_path):
    jobs = runtime.jobs
    with pytest.raises(RequestError, match="unknown sft setting"):
        jobs.start("bad", kind="sft", data=str(chat_data), settings={"rnak": 4})
    with pytest.raises(RequestError, match="rank=0"):
        jobs.start("bad", kind="sft", data=str(chat_data), settings={"rank": 0})
    with pytest.raises(RequestError, match="use letters"):
        jobs.start("../x", kind="sft", data=str(chat_data))
    with pytest.raises(RequestError, match="does not exist"):
        jobs.start("bad", kind="sft", data=str(tmp_path / "missing.jsonl"))

    keep = jobs.start("keep", kind="sft", data=str(chat_data), settings=QUICK)
    jobs.wait("keep", 300)
    assert keep.status == "succeeded", keep.tail(30)
    with pytest.raises(RequestError, match="already exists"):
        jobs.start("keep", kind="sft", data=str(chat_data), settings=QUICK)

    doomed = jobs.start("doomed", kind="sft", data=str(chat_data), settings=SLOW)
    wait_for_steps(jobs, "doomed", 2)
    with pytest.raises(RequestError, match="still running"):
        jobs.delete("doomed")
    jobs.cancel("doomed")
    assert doomed.status == "cancelled"
    jobs.wait("doomed", 60)
    assert doomed.status == "cancelled" and "doomed" not in runtime.engine.adapters
    jobs.delete("doomed")
    home = Path(runtime.settings.home)
    assert not (home / "runs" / "doomed").exists() and not (home / "adapters" / "doomed").exists()
    assert "doomed" not in jobs.jobs
    assert (home / "adapters" / "keep" / "adapter_model.safetensors").is_file() and "keep" in runtime.engine.adapters

    empty = tmp_path / "nothing.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    failed = jobs.start("nothing", kind="sft", data=str(empty), settings=QUICK)
    jobs.wait("nothing", 300)
    assert failed.status == "failed" and "every row was rejected" in failed.error

    jobs.delete("keep")
    assert "keep" not in runtime.engine.adapters


def test_sft_then_dpo_serves_both_adapters(runtime, chat_data):
    jobs = runtime.jobs
    pairs = write_pairs(Path(runtime.settings.home) / "pairs.jsonl", 16)
    job = jobs.start("loop", kind="sft+dpo", data=str(chat_data), dpo_data=str(pairs), settings=QUICK,
                     dpo_settings={"max_steps": 3, "batch_size": 4, "grad_accum": 1, "rank": 4, "alpha": 8,
                                   "threads": 1, "save_every": 0, "precision": "fp32"})
    jobs.wait("loop", 400)
    assert job.status == "succeeded", job.tail(40)
    assert {"loop-sft", "loop"} <= set(runtime.engine.adapters)
    facts = json.loads((jobs.adapter_dir("loop") / "parley_adapter.json").read_text())
    assert facts["kind"] == "dpo" and facts["init_adapter"] == str(jobs.adapter_dir("loop-sft"))
    stages = [r["stage"] for r in jobs.metrics("loop") if "loss" in r]
    assert stages == ["sft"] * 4 + ["dpo"] * 3
    assert jobs.usable_adapters("loop") == ["loop", "loop-sft"]
    settings = jobs.effective_settings("loop")
    assert settings["rank"] == 4 and settings["dpo.beta"] == 0.1 and settings["data.dpo"] == str(pairs)


def test_the_estimate_measures_this_data_here(runtime, chat_data):
    est = runtime.jobs.estimate(kind="sft", data=str(chat_data), settings={**SLOW, "max_steps": 50})
    assert est["planned_steps"] == 50 and est["probe_steps"] >= 3
    assert 0 < est["sec_per_step"] < 10 and est["total_s"] >= 50 * est["sec_per_step"]
    assert est["peak_memory_mb"] > 50
    assert not [p for p in (Path(runtime.settings.home) / "runs").iterdir() if p.name.startswith(".probe")]


# ---- what the Fine-tune tab shows (ui/training.py, bot/training_data.py) --------------------------------
def test_the_preview_highlights_exactly_the_trained_tokens(tiny_tokenizer, tmp_path):
    from bot import training_data
    from ui.training import preview_html

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "<b>hi</b>"},
                                             {"role": "assistant", "content": "hello & bye"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    preview = training_data.preview(path, tiny_tokenizer, home=tmp_path)
    assert preview.formats == {"rows.jsonl": "messages"} and preview.kept == 1
    assert preview.reject_lines == ["rows.jsonl:2: no assistant turn to train on"]
    trained = "".join(text for text, flag in preview.samples[0].segments if flag)
    assert trained == "hello & bye<|im_end|>"
    page = preview_html(preview)
    assert '<mark class="parley-trained"' in page and "hello &amp; bye" in page and "&lt;b&gt;hi" in page
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    dpo_preview = training_data.preview(pairs, tiny_tokenizer, home=tmp_path, kind="dpo")
    assert [s.label for s in dpo_preview.samples] == ["chosen", "rejected", "chosen", "rejected"]
    assert "".join(t for t, f in dpo_preview.samples[1].segments if f) == "I cannot do sums.<|im_end|>"


def test_settings_fields_presets_curves_and_diffs():
    from finetune.dpo import DpoConfig
    from finetune.lora import LoraConfig
    from ui.training import (DPO_PRESETS, PRESETS, changed_settings, curve_frames, field_docs, length_histogram,
                             settings_diff, settings_fields, smooth)

    docs = field_docs(LoraConfig)
    assert docs["rank"] == "LoRA rank r." and "alpha/r" in docs["alpha"]
    spec = settings_fields(LoraConfig)
    names = [name for name, *_ in spec]
    assert "data" not in names and {"rank", "use_dora", "lr_scheduler", "nan_policy"} <= set(names)
    for preset in PRESETS.values():  # every preset is a valid config
        LoraConfig(data=["x"], **preset)
    for preset in DPO_PRESETS.values():
        DpoConfig(data=["x"], **preset)
    values = [{"rank": 8.0, "use_dora": True}.get(name, default) for name, _, default, _ in spec]
    assert changed_settings(spec, values) == {"rank": 8, "use_dora": True}
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    frames = curve_frames([{"step": 0, "eval_loss": 3.0, "stage": "sft"},
                           {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "stage": "sft"},
                           {"step": 2, "loss": 1.0, "lr": 1e-3, "stage": "sft"},
                           {"step": 1, "loss": 0.69, "reward_margin": 0.1, "stage": "dpo"}],
                          [{"t": 100.0, "rss_mb": 500.0}, {"t": 160.0, "rss_mb": 520.0}])
    loss = frames["loss"]
    assert set(loss["series"]) == {"sft eval", "sft train (raw)", "sft train (smoothed)", "dpo train (raw)",
                                   "dpo train (smoothed)"}
    assert loss[loss["series"] == "dpo train (raw)"]["step"].tolist() == [3]  # DPO's steps follow SFT's
    assert frames["memory"]["minutes"].tolist() == [0.0, 1.0] and frames["margin"]["value"].tolist() == [0.1]
    hist = length_histogram([10, 12, 100])
    assert hist["rows"].sum() == 3 and hist["tokens"].iloc[0] == "8-15"
    assert settings_diff({"rank": 8, "lr": 1}, {"rank": 16, "lr": 1}) == [["rank", "8", "16"]]
