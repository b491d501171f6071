"""The DPO recipe on the tiny model: pair checks with file:line reasons, the encoding TRL trains on,
the loss falling while chosen replies gain log-probability over rejected ones, resume, SFT then DPO,
the preference store as a source, and the CLI verb."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from finetune import data as D
from finetune import dpo
from finetune.errors import DataError, ResumeError
from tests.unit.finetune_fixtures import one_torch_thread, read_metrics, tiny_lora_config, write_chat_jsonl  # noqa: F401


def write_pairs(path, n: int, seed: int = 0):
    """n learnable pairs: the chosen reply adds the numbers, the rejected one refuses."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"add {a} and {b}"}],
                                 "chosen": f"{a}+{b}={a + b}", "rejected": "I cannot do sums."}) + "\n")
    return path


def tiny_dpo_config(model_dir, data, output, **overrides):
    settings = dict(data=[str(data)], output=str(output), model=str(model_dir), max_length=256, batch_size=4,
                    grad_accum=1, max_steps=10, learning_rate=1e-2, rank=4, alpha=8, beta=0.1, warmup_ratio=0.0,
                    eval_fraction=0.2, max_eval_rows=4, save_every=0, progress=False, device="cpu", precision="fp32",
                    lr_scheduler="constant")
    settings.update(overrides)
    return dpo.DpoConfig(**settings)


def test_bad_pairs_are_rejected_with_file_line_and_reason(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "add 1 and 2", "chosen": "1+2=3", "rejected": "no"},                                  # 1 ok
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello"},                                # 2
        {"prompt": "hi", "chosen": "same", "rejected": " same "},                                          # 3
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": "x", "rejected": "y"},                                                                  # 4
        {"prompt": "q", "chosen": [{"role": "assistant", "content": "good"}], "rejected": ""},             # 5
        {"prompt": "q", "chosen": [{"role": "user", "content": "good"}], "rejected": "bad"},               # 6
        {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},                   # 7
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}],
         "chosen": [{"role": "assistant", "content": "ok"}], "rejected": "no"},                            # 8 ok
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    pairs, report = dpo.load_pairs([path])
    assert [p.source for p in pairs] == ["pairs.jsonl:1", "pairs.jsonl:8"]
    reasons = {r.source: r.reason for r in report.rejects}
    assert "missing key 'rejected'" in reasons["pairs.jsonl:2"]
    assert "same reply" in reasons["pairs.jsonl:3"]
    assert "must be the user turn" in reasons["pairs.jsonl:4"]
    assert "rejected: empty reply" in reasons["pairs.jsonl:5"]
    assert "one assistant message" in reasons["pairs.jsonl:6"]
    assert "unknown role 'robot'" in reasons["pairs.jsonl:7"]
    assert "invalid JSON" in reasons["pairs.jsonl:9"]
    assert pairs[0].prompt == [{"role": "user", "content": "add 1 and 2"}]
    assert pairs[1].chosen == "ok" and len(pairs[1].prompt) == 4
    assert any("pairs.jsonl:3: chosen and rejected" in line for line in report.lines())
    with pytest.raises(DataError, match="more than the allowed"):
        report.check(0.05)


def test_a_pair_is_encoded_with_the_lora_recipes_mask(tiny_tokenizer):
    pair = dpo.check_pair({"prompt": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                      {"role": "user", "content": "q2"}],
                           "chosen": "good", "rejected": "bad reply"}, "x:1")
    enc = dpo.encode_pair(tiny_tokenizer, pair, max_length=512)
    decode = lambda ids: tiny_tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert decode(enc.chosen_ids) == "good<|im_end|>"  # the reply and its end-of-turn token, no newline
    assert decode(enc.rejected_ids) == "bad reply<|im_end|>"
    assert decode(enc.prompt_ids).endswith("<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n")
    assert "a1<|im_end|>" in decode(enc.prompt_ids)  # the earlier reply is context, not trained
    # Exactly the tokens encode_chat labels for the same conversation.
    full = D.encode_chat(tiny_tokenizer, D.Example("x:1", [*[{**m, "weight": 0} if m["role"] == "assistant" else m
                                                             for m in pair.prompt],
                                                           {"role": "assistant", "content": "good"}]))
    assert [t for t, l in zip(full.input_ids, full.labels) if l != D.IGNORE_INDEX] == enc.chosen_ids
    report = D.DataReport()
    assert dpo.encode_pairs(tiny_tokenizer, [pair], report, max_length=20) == []
    assert "above max_length=20" in report.rejects[0].reason and report.rejects[0].source == "x:1"


def _logp_margin(model, tokenizer, pairs) -> float:
    """Mean of log p(chosen) - log p(rejected) under ``model``, summed over the reply tokens."""
    total = 0.0
    for pair in pairs:
        enc = dpo.encode_pair(tokenizer, pair, 256)
        values = []
        for reply in (enc.chosen_ids, enc.rejected_ids):
            ids = torch.tensor([enc.prompt_ids + reply])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
            values.append(logp[len(enc.prompt_ids) - 1:].sum().item())
        total += values[0] - values[1]
    return total / len(pairs)


def test_dpo_loss_falls_and_chosen_gains_over_rejected(tiny_model_dir, tmp_path, parley_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    out = tmp_path / "dpo-adapter"
    result = dpo.train_dpo(tiny_dpo_config(tiny_model_dir, data, out, max_steps=12), parley_home)
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    initial = next(r for r in records if r["step"] == 0)
    assert initial["eval_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert result["eval_reward_margin"] > 0.5 and result["eval_reward_accuracy"] == 1.0
    assert result["eval_loss"] < initial["eval_loss"]
    # The saved adapter, loaded as the chat loads it, prefers the chosen replies more than the base does.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = dpo.load_pairs([data])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = _logp_margin(base, tokenizer, pairs)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    after = _logp_margin(tuned, tokenizer, pairs)
    assert after > before + 1.0, (before, after)
    facts = json.loads((out / "parley_adapter.json").read_text())
    assert facts["kind"] == "dpo" and facts["metrics"]["step"] == 12 and facts["data_stats"]["train_pairs"] == 20
    assert not (out / "ref").exists()  # TRL's frozen reference copy is not part of the adapter


def test_resume_continues_from_the_checkpoint(tiny_model_dir, tmp_path, parley_home):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    out = tmp_path / "resumed"
    first = dpo.train_dpo(tiny_dpo_config(tiny_model_dir, data, out, max_steps=6, stop_after_steps=3), parley_home)
    assert first["stopped_early"] and first["step"] == 3
    assert not (out / "adapter_config.json").exists()
    with pytest.raises(ResumeError, match="beta"):
        dpo.train_dpo(tiny_dpo_config(tiny_model_dir, data, out, max_steps=6, beta=0.5, resume=True), parley_home)
    result = dpo.train_dpo(tiny_dpo_config(tiny_model_dir, data, out, max_steps=6, resume=True), parley_home)
    assert result["step"] == 6 and not result["stopped"]
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sft_then_dpo_starts_from_the_sft_adapter(tiny_model_dir, tmp_path, parley_home):
    from finetune import lora

    sft = tmp_path / "sft"
    lora.train_lora(tiny_lora_config(tiny_model_dir, write_chat_jsonl(tmp_path / "chat.jsonl", 16), sft,
                                     max_steps=4), parley_home)
    out = tmp_path / "dpo-on-sft"
    result = dpo.train_dpo(tiny_dpo_config(tiny_model_dir, write_pairs(tmp_path / "pairs.jsonl", 16), out,
                                           init_adapter=str(sft), max_steps=4), parley_home)
    train = [r for r in read_metrics(out) if "loss" in r]
    # The reference is a frozen copy of the SFT adapter: the first loss is ln 2 again.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert result["eval_reward_margin"] > 0
    facts = json.loads((out / "parley_adapter.json").read_text())
    assert facts["init_adapter"] == str(sft)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4  # the SFT adapter's own rank, trained further


def test_preferences_come_from_the_store(parley_home, monkeypatch):
    from bot.store import Store

    with pytest.raises(DataError, match="no chat store"):
        dpo.load_pairs([dpo.PREFERENCES], parley_home)
    Store(parley_home / "parley.db")
    if not hasattr(Store, "preference_pairs"):
        with pytest.raises(DataError, match="preference pairs"):
            dpo.load_pairs([dpo.PREFERENCES], parley_home)
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5", "source": "vote",
             "id": 7},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "hello", "source": "vote",
             "id": 8}]
    monkeypatch.setattr(Store, "preference_pairs", lambda self: iter(rows), raising=False)
    pairs, report = dpo.load_pairs([dpo.PREFERENCES], parley_home)
    assert [(p.source, p.chosen, p.meta) for p in pairs] == [("parley.db#pair=7", "4", {"id": 7, "source": "vote"})]
    assert report.rejects[0].source == "parley.db#pair=8"


def test_cli_exports_trl_pairs_and_refuses_bad_settings(tmp_path, parley_home, capsys):
    from bot.cli import main

    data = write_pairs(tmp_path / "pairs.jsonl", 3)
    out = tmp_path / "export.jsonl"
    assert main(["--home", str(parley_home), "finetune", "dpo", "--data", str(data), "--export", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert rows[0]["chosen"][0]["role"] == "assistant" and rows[0]["prompt"][0]["role"] == "user"
    assert main(["--home", str(parley_home), "finetune", "dpo", "--data", str(data), "--output", "x",
                 "--beta", "0", "--set", "loss_type=nope"]) == 2
    err = capsys.readouterr().err
    assert "beta=0" in err and "loss_type='nope'" in err
