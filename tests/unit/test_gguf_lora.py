"""PEFT LoRA -> GGUF LoRA: on the tiny Llama (exported to a float32 GGUF), llama.cpp's logits with
the converted adapter match peft's within float tolerance, for plain LoRA, rsLoRA and per-module
ranks/alphas; what llama.cpp cannot apply is refused with a clear error; conversions are cached."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bot.errors import ModelLoadError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install builds it)")

TOLERANCE = 1e-4  # float32 weights, float32 KV cache, no flash attention: differences are ~1e-6


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    from bot.backends.gguf_lora import export_llama_gguf

    return export_llama_gguf(tiny_model_dir, tmp_path_factory.mktemp("lora-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer.apply_chat_template([{"role": "user", "content": "hello there, how are you?"}],
                                         add_generation_prompt=True, tokenize=True)["input_ids"]


class LlamaLogits:
    """The last-position logits llama.cpp computes for a prompt, with or without a LoRA file."""

    def __init__(self, gguf: Path):
        from bot.backends.llamacpp import _import_llama

        _import_llama()  # quiet logs
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def __call__(self, ids: list[int], lora: Path | None = None) -> np.ndarray:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_threads, params.n_threads_batch = 512, 2, 2
        params.type_k = params.type_v = 0  # float32 cache
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        adapter = None
        try:
            if lora is not None:
                adapter = llama_cpp.llama_adapter_lora_init(self.model, str(lora).encode())
                assert adapter, f"llama.cpp refused {lora}"
                llama_cpp.llama_set_adapters_lora(ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                                  (ctypes.c_float * 1)(1.0))
            tokens = (llama_cpp.llama_token * len(ids))(*ids)  # kept alive for the decode
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, len(ids))) == 0
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)).copy()
        finally:
            llama_cpp.llama_free(ctx)
            if adapter:
                llama_cpp.llama_adapter_lora_free(adapter)

    def close(self):
        llama_cpp.llama_model_free(self.model)


@pytest.fixture(scope="module")
def llama_logits(tiny_gguf):
    runner = LlamaLogits(tiny_gguf)
    yield runner
    runner.close()


def peft_adapter(model_dir: Path, out: Path, seed: int, **config) -> tuple[Path, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **config)).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def peft_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def test_the_exported_base_gguf_computes_the_hf_model(tiny_model_dir, llama_logits, prompt_ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt_ids])).logits[0, -1].numpy()
    assert np.abs(llama_logits(prompt_ids) - expected).max() < TOLERANCE


@pytest.mark.parametrize("name,config", [
    ("all-linear", dict(r=4, lora_alpha=64, target_modules="all-linear")),
    ("attention-only", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("rslora", dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    ("patterns", dict(r=4, lora_alpha=16, target_modules="all-linear", rank_pattern={"q_proj": 2, "down_proj": 8},
                      alpha_pattern={"k_proj": 64})),
])
def test_converted_lora_logits_match_peft(name, config, tiny_model_dir, tiny_gguf, llama_logits, prompt_ids,
                                          tmp_path):
    from bot.backends.gguf_lora import convert_peft_lora

    folder, model = peft_adapter(tiny_model_dir, tmp_path / name, seed=3, **config)
    expected = peft_logits(model, prompt_ids)
    with model.disable_adapter():
        base = peft_logits(model, prompt_ids)
    assert np.abs(expected - base).max() > 0.05  # the adapter has a visible effect to reproduce
    got = llama_logits(prompt_ids, convert_peft_lora(folder, tiny_gguf))
    assert np.abs(got - expected).max() < TOLERANCE, name


def test_tensor_names_and_metadata_follow_convert_lora_to_gguf(tiny_model_dir, tiny_gguf, tmp_path):
    import gguf

    from bot.backends.gguf_lora import convert_peft_lora

    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    reader = gguf.GGUFReader(str(convert_peft_lora(folder, tiny_gguf)))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    # lora_a: ne [in, rank]; lora_b: ne [rank, out] (PEFT's A [rank, in] and B [out, rank], reversed)
    assert shapes == {"blk.0.attn_q.weight.lora_a": [64, 4], "blk.0.attn_q.weight.lora_b": [4, 64],
                      "blk.1.attn_q.weight.lora_a": [64, 4], "blk.1.attn_q.weight.lora_b": [4, 64]}


def test_conversion_is_cached_beside_the_adapter_and_redone_when_it_changes(tiny_model_dir, tiny_gguf, tmp_path):
    from bot.backends.gguf_lora import CACHE_PREFIX, convert_peft_lora

    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    first = convert_peft_lora(folder, tiny_gguf)
    assert first.parent == folder and first.name.startswith(CACHE_PREFIX)
    mtime = first.stat().st_mtime_ns
    assert convert_peft_lora(folder, tiny_gguf) == first and first.stat().st_mtime_ns == mtime
    peft_adapter(tiny_model_dir, folder, seed=2, r=4, lora_alpha=8, target_modules="all-linear")  # re-trained
    second = convert_peft_lora(folder, tiny_gguf)
    assert second != first and second.is_file() and not first.exists()
    assert [p.name for p in folder.glob(f"{CACHE_PREFIX}*")] == [second.name]


def test_an_adapter_folder_that_cannot_be_written_is_converted_into_the_cache(tiny_model_dir, tiny_gguf, tmp_path,
                                                                               monkeypatch):
    import bot.backends.gguf_lora as gl

    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "ro", seed=1, r=4, lora_alpha=8, target_modules=["v_proj"])
    real = gl.write_lora_gguf

    def write(path, *args, **kwargs):  # a read-only folder (chmod does not stop root, so simulate it)
        if Path(path).parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(gl, "write_lora_gguf", write)
    out = gl.convert_peft_lora(folder, tiny_gguf, cache_dir=tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "ro" and out.is_file()
    assert gl.convert_peft_lora(folder, tiny_gguf, cache_dir=tmp_path / "cache") == out  # found there next time


@pytest.mark.parametrize("change,words", [
    (lambda cfg: cfg.update(use_dora=True), "DoRA"),
    (lambda cfg: cfg.update(lora_bias=True), "biases"),
])
def test_what_llamacpp_cannot_apply_is_refused_clearly(change, words, tiny_model_dir, tiny_gguf, tmp_path):
    from bot.backends.gguf_lora import convert_peft_lora

    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=words):
        convert_peft_lora(folder, tiny_gguf)


def test_embeddings_and_full_modules_are_refused(tiny_model_dir, tiny_gguf, tmp_path):
    from bot.backends.gguf_lora import convert_peft_lora

    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "emb", seed=1, r=4, lora_alpha=8,
                             target_modules=["embed_tokens"])
    with pytest.raises(ModelLoadError, match="token embeddings"):
        convert_peft_lora(folder, tiny_gguf)
    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "full", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"],
                             modules_to_save=["lm_head"])
    with pytest.raises(ModelLoadError, match="not a LoRA A/B matrix"):
        convert_peft_lora(folder, tiny_gguf)


def test_an_adapter_for_another_base_is_refused_before_llamacpp_sees_it(tmp_path, tiny_gguf):
    from bot.backends.gguf_lora import convert_peft_lora
    from tests.tiny import build_model, build_tokenizer

    other = tmp_path / "other"
    model = build_model(len(build_tokenizer()), seed=0)
    model.config.intermediate_size = 96
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 96})
    LlamaForCausalLM(config).save_pretrained(other)
    build_tokenizer().save_pretrained(other)
    folder, _ = peft_adapter(other, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["up_proj"])
    with pytest.raises(ModelLoadError, match="trained for another base model"):
        convert_peft_lora(folder, tiny_gguf)


def test_a_finetune_style_adapter_loads_through_the_engine(tiny_model_dir, tiny_gguf, tmp_path):
    """What `parley finetune lora` writes (a folder with README, config, safetensors) loads as is."""
    from transformers import AutoTokenizer

    from bot.backends.llamacpp import LlamaCppEngine
    from bot.engine import GenerationParams

    folder, _ = peft_adapter(tiny_model_dir, tmp_path / "ft", seed=5, r=8, lora_alpha=16, target_modules="all-linear",
                             lora_dropout=0.05)
    shutil.copy(folder / "adapter_config.json", folder / "adapter_config.backup.json")
    engine = LlamaCppEngine(tiny_gguf, AutoTokenizer.from_pretrained(tiny_model_dir), name="tiny", n_threads=2)
    try:
        engine.load_adapter("ft", str(folder))
        params = GenerationParams(temperature=0, max_new_tokens=8)
        messages = [{"role": "user", "content": "hi"}]
        assert engine.generate(messages, params, adapter="ft")[0] != engine.generate(messages, params)[0]
    finally:
        engine.close()
