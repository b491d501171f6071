"""`parley finetune ...` through argparse, plus merge and eval on a trained tiny adapter."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bot.errors import ParleyError
from finetune.cli import add_parser
from tests.unit.finetune_fixtures import one_torch_thread, write_chat_jsonl  # noqa: F401


def _parser():
    parser = argparse.ArgumentParser(prog="parley")
    sub = parser.add_subparsers(dest="verb", required=True)
    add_parser(sub)
    return parser


def _run(home, *argv):
    args = _parser().parse_args(list(argv))
    args.home = home  # the main CLI supplies PARLEY_HOME
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny adapter trained through the CLI on a bare --output name."""
    home = tmp_path_factory.mktemp("home")
    data = write_chat_jsonl(home / "chat.jsonl", 24, seed=2)
    torch.set_num_threads(1)
    code = _run(home, "finetune", "lora", "--data", str(data), "--model", str(tiny_model_dir), "--output", "tiny",
                "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--max-steps", "30", "--batch-size", "4",
                "--grad-accum", "1", "--max-length", "256", "--eval-every", "0", "--no-progress",
                "--set", "warmup_steps=2", "--set", "eval_fraction=0.2", "--device", "cpu")
    assert code == 0
    return home, data


def test_lora_verb_writes_to_parley_home_adapters(trained, tiny_model_dir):
    home, data = trained
    out = home / "adapters" / "tiny"
    facts = json.loads((out / "parley_adapter.json").read_text())
    assert facts["hyperparameters"]["rank"] == 4 and facts["hyperparameters"]["learning_rate"] == 0.01
    assert facts["hyperparameters"]["warmup_steps"] == 2  # from --set
    assert facts["metrics"]["eval_loss"] < facts["metrics"]["initial_eval_loss"]  # it learned


def test_flags_override_the_toml_file(tmp_path, tiny_model_dir, parley_home):
    from finetune.cli import _overrides
    from finetune.lora import LoraConfig
    from finetune.runs import config_from_sources

    toml = tmp_path / "r.toml"
    toml.write_text('data = ["a.jsonl"]\nrank = 32\nalpha = 64\n')
    args = _parser().parse_args(["finetune", "lora", "--config", str(toml), "--rank", "8", "--set", "alpha=9"])
    cfg = config_from_sources(LoraConfig, args.config, _overrides(args), "lora")
    assert (cfg.rank, cfg.alpha, cfg.data) == (8, 9, ["a.jsonl"])


def test_user_errors_are_parley_errors(tmp_path, parley_home, tiny_model_dir):
    with pytest.raises(ParleyError, match="does not exist"):
        _run(parley_home, "finetune", "lora", "--data", str(tmp_path / "missing.jsonl"), "--model",
             str(tiny_model_dir), "--output", "x", "--no-progress")
    with pytest.raises(ParleyError, match="(?s)invalid LoRA settings.*rank=0"):
        _run(parley_home, "finetune", "lora", "--data", "a.jsonl", "--rank", "0", "--output", "x")
    with pytest.raises(ParleyError, match="either --from-feedback or --data"):
        _run(parley_home, "finetune", "lora", "--data", "a.jsonl", "--from-feedback")


def test_module_entry_point_prints_error_and_exits_2(tmp_path, capsys):
    from finetune.__main__ import main

    assert main(["--home", str(tmp_path), "lora", "--data", str(tmp_path / "nope.jsonl"), "--output", "x"]) == 2
    assert "error: data file" in capsys.readouterr().err


def test_merge_gives_the_same_logits_as_base_plus_adapter(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home, _ = trained
    merged_dir = tmp_path / "merged"
    assert _run(home, "finetune", "merge", "tiny", "--output", str(merged_dir)) == 0
    assert (merged_dir / "config.json").is_file() and (merged_dir / "parley_merged.json").is_file()
    assert not list(merged_dir.glob("adapter_*"))
    ids = torch.tensor([[1, 60, 61, 62, 63]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         home / "adapters" / "tiny")(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert torch.allclose(merged, peft, atol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-4)
    with pytest.raises(ParleyError, match="not empty.*--overwrite"):
        _run(home, "finetune", "merge", "tiny", "--output", str(merged_dir))


def test_eval_compares_base_and_adapter(trained, tmp_path, capsys):
    from finetune.evaluate import compare

    home, data = trained
    result = compare("tiny", [str(data)], home=home, max_rows=8, samples=2, max_new_tokens=5, device="cpu")
    assert result["rows"] == 8
    assert result["adapter_metrics"]["loss"] < result["base"]["loss"]
    assert len(result["samples"]) == 2 and {"base", "adapter", "reference", "prompt"} <= set(result["samples"][0])
    out_json = tmp_path / "eval.json"
    assert _run(home, "finetune", "eval", "tiny", "--data", str(data), "--max-rows", "4", "--samples", "1",
                "--max-new-tokens", "3", "--device", "cpu", "--json", str(out_json)) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "base" in printed and "adapter" in printed
    assert json.loads(out_json.read_text())["rows"] == 4


def test_merge_refuses_pickled_adapters(tmp_path, parley_home):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    (tmp_path / "bad" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ParleyError, match="pickled weights"):
        _run(parley_home, "finetune", "merge", str(tmp_path / "bad"), "--output", str(tmp_path / "m"))
