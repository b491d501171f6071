"""The LoRA recipe on the tiny model: resume, kill-while-saving, NaN guard, determinism, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune import lora, runs
from finetune.errors import FinetuneError, NonFiniteError, OutOfMemoryError, ResumeError
from tests.unit.finetune_fixtures import losses, one_torch_thread, read_metrics, tiny_lora_config, write_chat_jsonl  # noqa: F401


@pytest.fixture
def chat_file(tmp_path):
    return write_chat_jsonl(tmp_path / "chat.jsonl", 24, seed=1)


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_resume_gives_the_same_losses_as_one_straight_run(tiny_model_dir, chat_file, tmp_path, parley_home):
    common = dict(max_steps=20, save_every=5, grad_accum=2, eval_every=10)
    straight = tmp_path / "straight"
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, straight, **common), parley_home)

    resumed = tmp_path / "resumed"
    first = lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, resumed, stop_after_steps=10, **common),
                            parley_home)
    assert first["stopped_early"] and first["step"] == 10
    assert [s for s, _ in runs.list_checkpoints(resumed)] == [5, 10]
    seen = []
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, resumed, resume=True, **common), parley_home,
                    on_step=lambda r: seen.append(r["step"]))
    assert seen[0] == 11  # the first step after the checkpoint, not a restart
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in a] == pytest.approx([b[s] for s in a], rel=1e-6, abs=1e-7)
    lrs = {r["step"]: r["lr"] for r in read_metrics(resumed) if "lr" in r}
    assert lrs == {r["step"]: r["lr"] for r in read_metrics(straight) if "lr" in r}
    for name, t in _adapter_tensors(straight).items():
        assert torch.allclose(t, _adapter_tensors(resumed)[name], atol=1e-6), name


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(tiny_model_dir, chat_file, tmp_path,
                                                                       parley_home, monkeypatch):
    common = dict(max_steps=12, save_every=4, keep_checkpoints=5)
    straight = tmp_path / "straight"
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, straight, **common), parley_home)

    out = tmp_path / "killed"
    real_replace = runs.os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("checkpoint-000008"):
            raise KeyboardInterrupt("SIGKILL stand-in: the process dies before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", dying_replace)
    with pytest.raises((KeyboardInterrupt, FinetuneError)):
        lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, **common), parley_home)
    monkeypatch.setattr(runs.os, "replace", real_replace)
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-checkpoint-000008").is_dir()  # the half-written one
    assert [s for s, _ in runs.list_checkpoints(out)] == [4]  # ...is not a checkpoint

    seen = []
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, resume=True, **common), parley_home,
                    on_step=lambda r: seen.append(r["step"]))
    assert seen[0] == 5
    assert not (ckpts / ".tmp-checkpoint-000008").exists()
    a, b = losses(straight), losses(out)
    assert [a[s] for s in range(1, 13)] == pytest.approx([b[s] for s in range(1, 13)], rel=1e-6, abs=1e-7)


def _poison_step(monkeypatch, bad_step: int, grad_accum: int = 1, record=None):
    """Make the loss of one optimizer step infinite (as a poisoned batch would)."""
    real = lora.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, autocast, *rest):
        calls["n"] += 1
        step = (calls["n"] - 1) // grad_accum + 1
        if record is not None:
            record[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        loss, n = real(model, batch, autocast, *rest)
        if step == bad_step and model.training:
            loss = loss * float("inf")
        return loss, n

    monkeypatch.setattr(lora, "token_loss_sum", poisoned)


def test_nan_guard_aborts_and_saves_nothing_non_finite(tiny_model_dir, chat_file, tmp_path, parley_home, monkeypatch):
    out = tmp_path / "nan"
    _poison_step(monkeypatch, bad_step=4)
    cfg = tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=8, save_every=2)
    with pytest.raises(NonFiniteError, match=r"step 4: loss inf .* not finite.*Lower --lr.*nan_policy=skip.*--resume"):
        lora.train_lora(cfg, parley_home)
    assert not (out / "adapter_model.safetensors").exists()
    assert [s for s, _ in runs.list_checkpoints(out)] == [2]
    from safetensors.torch import load_file

    for t in load_file(out / "checkpoints" / "checkpoint-000002" / "weights.safetensors").values():
        assert torch.isfinite(t).all()


def test_nan_guard_skip_leaves_weights_and_adam_state_untouched(tiny_model_dir, chat_file, tmp_path, parley_home,
                                                                monkeypatch):
    out = tmp_path / "skip"
    weights_at = {}
    _poison_step(monkeypatch, bad_step=3, record=weights_at)
    cfg = tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=6, nan_policy="skip", save_every=6)
    result = lora.train_lora(cfg, parley_home)
    assert result["skipped_steps"] == 1
    for name in weights_at[3]:
        assert torch.equal(weights_at[3][name], weights_at[4][name]), name  # step 3 changed nothing
    assert not all(torch.equal(weights_at[4][n], weights_at[5][n]) for n in weights_at[4])  # step 4 did
    opt = torch.load(out / "checkpoints" / "checkpoint-000006" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {5.0}  # 6 steps, one skipped
    for t in _adapter_tensors(out).values():
        assert torch.isfinite(t).all()
    assert any(r.get("skipped") for r in read_metrics(out))


def test_same_seed_same_losses_other_seed_other_losses_same_split(tiny_model_dir, chat_file, tmp_path, parley_home):
    def run(name, seed):
        out = tmp_path / name
        lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=4, seed=seed), parley_home)
        return losses(out), json.loads((out / "data_report.json").read_text())["stats"]["eval"]

    a, split_a = run("a", 1)
    b, split_b = run("b", 1)
    c, split_c = run("c", 2)
    assert a == b
    assert a != c
    assert split_a == split_b == split_c  # the split follows data_seed, not seed


def test_adapter_folder_model_card_and_loading(tiny_model_dir, chat_file, tmp_path, parley_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bot.models import validate_adapter_dir

    out = tmp_path / "card"
    cfg = tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=6, eval_every=3, eval_at_start=True)
    result = lora.train_lora(cfg, parley_home, command="parley finetune lora --data chat.jsonl")
    validate_adapter_dir(out)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "parley_adapter.json",
            "metrics.jsonl", "loss_curve.png", "data_report.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 8

    facts = json.loads((out / "parley_adapter.json").read_text())
    sha = facts["data"][0]["sha256"]
    assert facts["base_model"]["spec"] == str(tiny_model_dir)
    assert facts["hyperparameters"]["rank"] == 4 and facts["hyperparameters"]["learning_rate"] == 1e-2
    assert facts["metrics"]["eval_loss"] == pytest.approx(result["eval_loss"])
    assert math.isfinite(facts["metrics"]["initial_eval_loss"])
    assert facts["command"] == "parley finetune lora --data chat.jsonl"
    card = (out / "README.md").read_text()
    for needle in (str(tiny_model_dir), str(chat_file.resolve()), sha[:16], "| rank | `4` |", "eval_loss",
                   "parley finetune lora --data chat.jsonl", "parley chat --model"):
        assert needle in card, needle
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(math.isfinite(r["eval_ppl"]) for r in evals)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, out)
        after = model(ids).logits
    assert not torch.allclose(before, after)  # the adapter is really applied


def test_training_on_chat_feedback_from_a_real_store(tiny_model_dir, parley_home):
    from bot.models import validate_adapter_dir
    from bot.store import Store
    from finetune.data import load_feedback

    store = Store(parley_home / "parley.db")
    conv = store.create_conversation(title="t")
    good = store.add_turn(conv, messages=[{"role": "user", "content": "add 2 and 3"}], reply="2+3=5", model="m")
    fixed = store.add_turn(conv, messages=[{"role": "user", "content": "add 1 and 1"}], reply="3", model="m")
    bad = store.add_turn(conv, messages=[{"role": "user", "content": "add 4 and 4"}], reply="9", model="m")
    store.add_feedback(good, 1)
    store.add_feedback(fixed, -1, correction="1+1=2")
    store.add_feedback(bad, -1)
    for i in range(10):  # more rated conversations, so there is something to split off for eval
        c = store.create_conversation()
        t = store.add_turn(c, messages=[{"role": "user", "content": f"add {i} and 1"}], reply=f"{i}+1={i + 1}", model="m")
        store.add_feedback(t, 1)

    examples, report = load_feedback(parley_home)
    by_turn = {e.source.split("turn=")[1]: e.messages for e in examples}
    assert bad not in by_turn and len(examples) == 12
    assert by_turn[fixed][-1] == {"role": "assistant", "content": "1+1=2"}  # the correction, not the bad reply
    assert by_turn[fixed][:2] == [{"role": "user", "content": "add 2 and 3"}, {"role": "assistant", "content": "2+3=5"}]

    cfg = tiny_lora_config(tiny_model_dir, "feedback", "from-chat", max_steps=3)
    cfg.data = ["feedback"]
    result = lora.train_lora(cfg, parley_home)
    out = parley_home / "adapters" / "from-chat"  # a bare --output name lands in PARLEY_HOME/adapters
    assert result["output"] == str(out)
    validate_adapter_dir(out)
    facts = json.loads((out / "parley_adapter.json").read_text())
    assert facts["data"][0]["path"].endswith("parley.db") and facts["data"][0]["rows"] == 12

    # ...and the chat engine switches to it at once (feedback -> adapter -> chat).
    from bot.engine import Engine, GenerationParams
    from bot.models import load_model

    engine = Engine(load_model(str(tiny_model_dir), parley_home, device="cpu", progress=False))
    try:
        engine.load_adapter("from-chat", str(out))
        text, _ = engine.generate([{"role": "user", "content": "add 2 and 3"}],
                                  GenerationParams(max_new_tokens=4, temperature=0), adapter="from-chat")
        assert isinstance(text, str) and "from-chat" in engine.adapters
    finally:
        engine.close()


def test_feedback_without_a_store_explains_what_to_do(tiny_model_dir, parley_home):
    cfg = tiny_lora_config(tiny_model_dir, "feedback", "x")
    cfg.data = ["feedback"]
    with pytest.raises(FinetuneError, match="no chat store.*rate or correct some replies"):
        lora.train_lora(cfg, parley_home)


def test_out_of_memory_gives_a_suggestion(tiny_model_dir, chat_file, tmp_path, parley_home, monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(lora, "token_loss_sum", oom)
    with pytest.raises(OutOfMemoryError, match=r"ran out of cpu memory at step 1.*--batch-size.*--grad-accum.*--gradient-checkpointing"):
        lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, tmp_path / "oom"), parley_home)


def test_existing_output_and_changed_settings_are_refused(tiny_model_dir, chat_file, tmp_path, parley_home):
    out = tmp_path / "o"
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=4, stop_after_steps=2), parley_home)
    with pytest.raises(FinetuneError, match="already holds a training run.*--resume.*--overwrite"):
        lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=4), parley_home)
    with pytest.raises(ResumeError, match="learning_rate: checkpoint 0.01, now 0.001"):
        lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=4, resume=True,
                                         learning_rate=1e-3), parley_home)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, tmp_path / "empty", resume=True), parley_home)


def test_config_reports_every_problem_at_once():
    with pytest.raises(FinetuneError) as info:
        lora.LoraConfig(data=["x"], rank=0, dropout=2.0, lr_scheduler="wavy", nan_policy="ignore")
    text = str(info.value)
    for needle in ("rank=0", "dropout=2.0", "lr_scheduler='wavy'", "nan_policy='ignore'"):
        assert needle in text


def test_config_sources_precedence_and_unknown_keys(tmp_path):
    toml = tmp_path / "recipe.toml"
    toml.write_text('[lora]\ndata = ["a.jsonl"]\nrank = 8\nalpha = 16\nlearning_rate = 1e-4\n')
    cfg = runs.config_from_sources(lora.LoraConfig, toml, {**runs.parse_set_args(["alpha=64", "use_dora=true"]),
                                                           "learning_rate": 3e-4}, "lora")
    assert (cfg.rank, cfg.alpha, cfg.use_dora, cfg.learning_rate, cfg.data) == (8, 64, True, 3e-4, ["a.jsonl"])
    with pytest.raises(FinetuneError, match="unknown setting.*lora_rank.*known: .*rank"):
        runs.config_from_sources(lora.LoraConfig, None, {"data": ["a"], "lora_rank": "8"}, "lora")


def test_bare_output_names_go_to_parley_home(tmp_path):
    assert lora.resolve_output("mine", tmp_path) == tmp_path / "adapters" / "mine"
    assert lora.resolve_output("./mine", tmp_path).name == "mine"
    assert lora.resolve_output(str(tmp_path / "x"), tmp_path) == tmp_path / "x"


def test_dora_and_rslora_train(tiny_model_dir, chat_file, tmp_path, parley_home):
    out = tmp_path / "dora"
    lora.train_lora(tiny_lora_config(tiny_model_dir, chat_file, out, max_steps=2, use_dora=True, use_rslora=True,
                                     target_modules="q_proj,v_proj"), parley_home)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and set(config["target_modules"]) == {"q_proj", "v_proj"}


def test_selected_positions_head_gives_the_same_loss_and_gradients(tiny_model_dir, chat_file):
    import contextlib

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import data as D

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples, _ = D.load_examples([chat_file])
    batch = D.collate(D.encode_all(tok, examples[:4], D.DataReport(), max_length=256), tok.pad_token_id)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           PeftLoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    full, n_full = lora.token_loss_sum(model, batch, contextlib.nullcontext)
    full.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with lora.SelectedPositionsHead(model) as head:
        part, n_part = lora.token_loss_sum(model, batch, contextlib.nullcontext, head)
        part.backward()
    assert n_full == n_part == int((batch["labels"][:, 1:] != -100).sum())
    assert part.item() == pytest.approx(full.item(), rel=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[k], atol=1e-6), k
    assert model.get_base_model().get_output_embeddings().__class__.__name__ == "Linear"  # restored
