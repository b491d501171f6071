"""The recipes on a CUDA GPU (skipped without one): bf16 autocast, loss goes down, outputs load."""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.finetune_fixtures import tiny_lora_config, write_chat_jsonl


def test_lora_trains_in_bf16_on_cuda_and_resumes(tiny_model_dir, tmp_path, parley_home):
    from finetune import lora

    data = write_chat_jsonl(tmp_path / "chat.jsonl", 64, seed=3)
    out = tmp_path / "gpu"
    cfg = tiny_lora_config(tiny_model_dir, data, out, device="cuda", max_steps=20, batch_size=8, save_every=10,
                           eval_at_start=True, stop_after_steps=10)
    lora.train_lora(cfg, parley_home)
    cfg = tiny_lora_config(tiny_model_dir, data, out, device="cuda", max_steps=20, batch_size=8, save_every=10,
                           eval_at_start=True, resume=True)
    result = lora.train_lora(cfg, parley_home)
    facts = json.loads((out / "parley_adapter.json").read_text())
    assert facts["hyperparameters"]["precision_used"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert result["eval_loss"] < facts["metrics"]["initial_eval_loss"]
    assert result["peak_memory_mb"] > 0


def test_smollm2_lora_on_cuda(embedded_home, tmp_path):
    from pathlib import Path

    from finetune.lora import LoraConfig, train_lora

    from tests.helpers import shared_data

    gsm8k = shared_data() / "instruct" / "gsm8k_train.messages.jsonl"
    if not gsm8k.exists():
        pytest.skip("GSM8K rows not present")
    rows = gsm8k.read_text().splitlines()
    (tmp_path / "t.jsonl").write_text("\n".join(rows[:256]) + "\n")
    (tmp_path / "e.jsonl").write_text("\n".join(rows[-32:]) + "\n")
    result = train_lora(LoraConfig(data=[str(tmp_path / "t.jsonl")], eval_data=[str(tmp_path / "e.jsonl")],
                                   output=str(tmp_path / "a"), batch_size=16, grad_accum=1, max_steps=16,
                                   learning_rate=1e-3, max_length=512, eval_every=0, progress=False,
                                   device="cuda", gradient_checkpointing=True), embedded_home)
    assert result["eval_loss"] < result["initial_eval_loss"] - 0.1


def test_classifier_on_cuda(tmp_path, parley_home):
    from finetune.classify import ClassifyConfig, train_classifier

    lines = ["text\tlabel"] + [f"{w} movie\t{int(w in ('good', 'great'))}" for w in ("good", "great", "bad", "awful")] * 50
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    result = train_classifier(ClassifyConfig(data=[str(tmp_path / "d.tsv")], output=str(tmp_path / "c"),
                                             labels=["negative", "positive"], epochs=3, batch_size=16,
                                             learning_rate=1e-4, progress=False, device="cuda"), parley_home)
    assert result["accuracy"] > 0.9
