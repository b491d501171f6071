"""A short LoRA run on the embedded SmolLM2 with GSM8K rows, and a short MiniLM classifier run on SST-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import shared_data

DATA = shared_data()
GSM8K = DATA / "instruct" / "gsm8k_train.messages.jsonl"
SST2 = DATA / "sentiment" / "sst2_train.tsv"
SST2_DEV = DATA / "sentiment" / "sst2_dev_from_train.tsv"


def _need(*paths):
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"shared data not present: {missing}")


def _short_gsm8k(path: Path, start: int, n: int) -> Path:
    """n GSM8K rows (from row `start`) with short answers, so each step stays cheap on a CPU."""
    rows = []
    with open(GSM8K) as fh:
        for i, line in enumerate(fh):
            if i < start:
                continue
            row = json.loads(line)
            if len(row["messages"][0]["content"]) + len(row["messages"][1]["content"]) < 500:
                rows.append(line)
            if len(rows) == n:
                break
    path.write_text("".join(rows))
    return path


def test_lora_on_gsm8k_lowers_eval_loss_and_the_adapter_loads_and_generates(embedded_home, tmp_path):
    import torch
    from peft import PeftModel

    from bot.models import load_model, validate_adapter_dir
    from finetune.lora import LoraConfig, train_lora

    _need(GSM8K)
    train = _short_gsm8k(tmp_path / "train.jsonl", 0, 24)
    held = _short_gsm8k(tmp_path / "eval.jsonl", 5000, 6)
    out = tmp_path / "gsm8k-lora"
    result = train_lora(LoraConfig(data=[str(train)], eval_data=[str(held)], output=str(out), rank=8, alpha=16,
                                   learning_rate=1e-3, batch_size=4, grad_accum=1, max_steps=5, warmup_steps=1,
                                   max_length=384, eval_every=0, save_every=0, progress=False, device="cpu"),
                        embedded_home)
    assert result["eval_loss"] < result["initial_eval_loss"] - 0.05, result
    validate_adapter_dir(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m"

    loaded = load_model("smollm2-135m", embedded_home, device="cpu", progress=False)
    model = PeftModel.from_pretrained(loaded.model, str(out), adapter_name="gsm8k")
    model.eval()
    enc = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                               add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False)
    text = loaded.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()


def test_classifier_on_sst2_beats_chance(embedded_home, tmp_path):
    from transformers import pipeline

    from finetune.classify import ClassifyConfig, train_classifier

    _need(SST2, SST2_DEV)
    result = train_classifier(ClassifyConfig(
        data=[str(SST2)], eval_data=[str(SST2_DEV)], output=str(tmp_path / "sst2"), text_column="sentence",
        label_column="label", labels=["negative", "positive"], max_rows=1280, epochs=1, batch_size=32,
        learning_rate=1e-4, max_eval_rows=400, eval_every=0, save_every=0, progress=False, device="cpu"),
        embedded_home)
    assert result["accuracy"] > 0.7, result  # chance is about 0.5; VADER gets 0.63 on SST-2
    clf = pipeline("text-classification", model=str(tmp_path / "sst2"), device="cpu")
    assert clf("a wonderful, moving film")[0]["label"] in ("negative", "positive")
