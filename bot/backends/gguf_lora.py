"""PEFT LoRA folders -> GGUF LoRA files that llama.cpp applies per request; a small Hugging Face
Llama folder -> a GGUF model (tests, and serving a merged fine-tune with llama.cpp).

The tensor naming is llama.cpp's own (``convert_lora_to_gguf.py``): the base weight's GGUF name
plus ``.lora_a`` / ``.lora_b``, e.g. ``blk.0.attn_q.weight.lora_a``. lora_a is PEFT's
``lora_A.weight`` [rank, in] and lora_b is ``lora_B.weight`` [out, rank]; GGUF stores shapes in
reverse, so llama.cpp sees a->ne = [in, rank] and b->ne = [rank, out], which is what it checks.
Metadata: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; llama.cpp
scales by alpha / rank, as PEFT does.

Two things differ from a plain copy:
* For the Llama family, the GGUF base's q and k projections were permuted (their output rows) for
  llama.cpp's rope layout when the GGUF was made. The same permutation is applied to lora_b of
  q and k (lora_a acts on the input side, which the permutation leaves alone).
* rsLoRA (alpha / sqrt(rank)), ``rank_pattern`` and ``alpha_pattern`` give per-module scales that
  one global alpha cannot express; the difference is folded into lora_b, so llama.cpp's
  alpha / rank reproduces PEFT's scale exactly.

A converted file is cached beside the adapter (``parley-lora-<digest>.gguf``; the digest covers
the adapter's bytes, the base model's shape and this converter's version), so each adapter is
converted once, and a re-trained adapter in the same folder is converted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bot.errors import ModelLoadError

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
CACHE_PREFIX = "parley-lora-"

# GGUF architectures whose q/k weights convert_hf_to_gguf.py permutes (LlamaModel.undo_permute).
PERMUTED_ARCHES = {"llama", "granite", "smollm3", "arcee", "nanbeige"}
# Architectures converted without that permutation (checked against llama.cpp's conversion code).
PLAIN_ARCHES = {"qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3", "phi3", "mistral3",
                "llama4", "olmo", "olmo2", "stablelm", "starcoder2", "gpt2", "falcon", "exaone"}


@dataclass
class BaseInfo:
    """What the converter needs to know about the GGUF base model."""

    arch: str
    n_head: int
    n_head_kv: int
    n_layer: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # GGUF name -> ne (GGUF order)

    def key(self) -> str:
        return f"{self.arch}:{self.n_head}:{self.n_head_kv}:{self.n_layer}:{len(self.shapes)}"


def read_base_info(gguf_path: str | Path) -> BaseInfo:
    """Architecture, head counts and tensor shapes of a GGUF model (reads the header only)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc

    def value(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = value("general.architecture")
    if not arch:
        raise ModelLoadError(f"{gguf_path} has no general.architecture: is it a GGUF model?")
    n_head = int(value(f"{arch}.attention.head_count", 0) or 0)
    return BaseInfo(arch=arch, n_head=n_head, n_head_kv=int(value(f"{arch}.attention.head_count_kv", n_head) or n_head),
                    n_layer=int(value(f"{arch}.block_count", 0) or 0),
                    shapes={t.name: tuple(int(x) for x in t.shape) for t in reader.tensors})


def permute_rows(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half rope layout -> llama.cpp's
    interleaved one, on the output rows. weights: [out, ...] -> the same shape."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _gguf_arch(arch: str):
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ModelLoadError(f"the gguf package does not know the architecture {arch!r}")
    return by_name[arch]


def gguf_tensor_name(hf_name: str, arch: str, n_layer: int) -> str | None:
    """A Hugging Face weight name -> its GGUF name (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``), with the gguf package's own table; None when it has no mapping."""
    import gguf

    table = gguf.get_tensor_name_map(_gguf_arch(arch), n_layer)
    return table.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _digest(folder: Path, info: BaseInfo) -> str:
    h = hashlib.sha256(f"{CONVERTER_VERSION}|{info.key()}|".encode())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def lora_tensors(folder: Path, info: BaseInfo) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """Read a PEFT LoRA folder; return the GGUF alpha and the (name, float32 array) pairs to write.

    Raises ModelLoadError naming the problem for what llama.cpp cannot apply: DoRA, LoRA biases,
    embedding LoRA, fully trained modules (``modules_to_save``), or a base of another shape.
    """
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ModelLoadError(f"adapter {folder} uses DoRA, which llama.cpp cannot apply: serve it with "
                             f"--backend transformers, or retrain without use_dora")
    if config.get("lora_bias"):
        raise ModelLoadError(f"adapter {folder} trains LoRA biases, which llama.cpp cannot apply: "
                             f"serve it with --backend transformers")
    alpha = float(config.get("lora_alpha") or config.get("r") or 8)
    rank_default = int(config.get("r") or 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    if info.arch not in PERMUTED_ARCHES | PLAIN_ARCHES:
        raise ModelLoadError(
            f"Parley converts LoRA adapters for GGUF bases of the architectures "
            f"{', '.join(sorted(PERMUTED_ARCHES | PLAIN_ARCHES))}; this base is {info.arch!r}: convert the "
            f"adapter with llama.cpp's convert_lora_to_gguf.py, or serve it with --backend transformers")

    weights = {k: v.float().numpy() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    embedding = next((k for k in weights if "lora_embedding_" in k), None)
    if embedding:
        raise ModelLoadError(f"adapter {folder} puts LoRA on the token embeddings ({embedding}); Parley's "
                             f"llama.cpp conversion does not cover that: serve it with --backend transformers")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    hf_module: dict[str, str] = {}
    for key, tensor in weights.items():
        name = key.replace("base_model.model.", "", 1)
        if ".lora_A." in name or name.endswith(".lora_A.weight"):
            part, module = "a", name.split(".lora_A")[0]
        elif ".lora_B." in name or name.endswith(".lora_B.weight"):
            part, module = "b", name.split(".lora_B")[0]
        elif "lora_magnitude_vector" in name:
            raise ModelLoadError(f"adapter {folder} is a DoRA adapter ({key}), which llama.cpp cannot apply")
        else:
            raise ModelLoadError(f"adapter {folder} holds {key}, which is not a LoRA A/B matrix (a module "
                                 f"trained in full, modules_to_save?): llama.cpp cannot apply it; serve it "
                                 f"with --backend transformers")
        gguf_name = gguf_tensor_name(module + ".weight", info.arch, info.n_layer)
        if gguf_name is None:
            raise ModelLoadError(f"adapter {folder}: no GGUF tensor corresponds to {module} in a "
                                 f"{info.arch} model (wrong base model?)")
        pairs.setdefault(gguf_name, {})[part] = tensor
        hf_module[gguf_name] = module

    out: list[tuple[str, np.ndarray]] = []
    for gguf_name in sorted(pairs):
        pair = pairs[gguf_name]
        if set(pair) != {"a", "b"}:
            raise ModelLoadError(f"adapter {folder}: {hf_module[gguf_name]} has lora_{'A' if 'a' in pair else 'B'} "
                                 f"without its partner: the file is incomplete")
        a, b = pair["a"], pair["b"]  # a: [rank, in], b: [out, rank]
        if gguf_name not in info.shapes:
            if gguf_name == "output.weight":
                raise ModelLoadError(f"adapter {folder} trains lm_head, but this base ties it to the token "
                                     f"embeddings, which llama.cpp cannot apply a LoRA to")
            raise ModelLoadError(f"adapter {folder}: the base model has no tensor {gguf_name} (wrong base model?)")
        base_in, base_out = info.shapes[gguf_name][:2]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != base_in or b.shape[0] != base_out or b.shape[1] != rank:
            raise ModelLoadError(
                f"adapter {folder}: {hf_module[gguf_name]} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"but the base weight is [{base_out}, {base_in}]: the adapter was trained for another base model")
        # PEFT's scale for this module, and the one llama.cpp will apply (alpha / rank).
        short = hf_module[gguf_name]
        m_rank = _pattern(rank_pattern, short, rank_default)
        m_alpha = float(_pattern(alpha_pattern, short, alpha))
        wanted = m_alpha / math.sqrt(m_rank) if rslora else m_alpha / m_rank
        applied = alpha / rank
        if not math.isclose(wanted, applied, rel_tol=1e-6):
            b = b * (wanted / applied)
        if info.arch in PERMUTED_ARCHES:
            if gguf_name.endswith(".attn_q.weight"):
                b = permute_rows(b, info.n_head, info.n_head)
            elif gguf_name.endswith(".attn_k.weight"):
                b = permute_rows(b, info.n_head, info.n_head_kv)
        out.append((gguf_name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        out.append((gguf_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    if not out:
        raise ModelLoadError(f"adapter {folder} has no LoRA weights")
    return alpha, out


def _pattern(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def write_lora_gguf(path: Path, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray]], *,
                    source: str = "") -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if source:
        writer.add_string("parley.source", source)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def convert_peft_lora(folder: str | Path, base_gguf: str | Path, *, cache_dir: str | Path | None = None,
                      info: BaseInfo | None = None) -> Path:
    """A PEFT LoRA folder -> a GGUF LoRA file for ``base_gguf``, converted once and cached.

    The file is written beside the adapter; when that folder is read-only, under ``cache_dir``.
    Safe against two processes converting at once (a file lock) and against crashes (written to a
    temporary name, then renamed).
    """
    from filelock import FileLock

    from bot.models import validate_adapter_dir

    folder = validate_adapter_dir(folder)
    info = info or read_base_info(base_gguf)
    digest = _digest(folder, info)
    name = f"{CACHE_PREFIX}{digest}.gguf"
    places = [folder] + ([Path(cache_dir) / folder.name] if cache_dir else [])
    for place in places:
        if (place / name).is_file():
            return place / name
    alpha, tensors = lora_tensors(folder, info)
    for place in places:
        target = place / name
        tmp = place / f".{name}.tmp-{os.getpid()}"
        try:
            place.mkdir(parents=True, exist_ok=True)
            with FileLock(str(place / f".{name}.lock"), timeout=120):
                if target.is_file():
                    return target
                try:
                    write_lora_gguf(tmp, info.arch, alpha, tensors, source=str(folder))
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
            for stale in place.glob(f"{CACHE_PREFIX}*.gguf"):  # an older conversion of this folder
                if stale.name != name:
                    stale.unlink(missing_ok=True)
            (place / f".{name}.lock").unlink(missing_ok=True)
            log.info("converted adapter %s to %s", folder, target)
            return target
        except OSError as exc:
            log.warning("could not write the GGUF LoRA beside %s (%s); trying the next place", place, exc)
    raise ModelLoadError(f"could not write the converted adapter for {folder}: its folder is not writable"
                         + ("" if cache_dir else "; give a cache folder"))


def export_llama_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str = "f32") -> Path:
    """Write a Hugging Face Llama folder (config.json, safetensors, a byte-level BPE tokenizer.json)
    as a GGUF model llama.cpp loads: f32 or f16 weights, q/k permuted as convert_hf_to_gguf.py does.

    Meant for small models (the tests' tiny Llama, a merged fine-tune of the embedded one); it
    covers the Llama architecture with a GPT-2 style tokenizer, nothing else.
    """
    import gguf
    from safetensors.torch import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ModelLoadError(f"{model_dir} is a {config.get('model_type')!r} model; export_llama_gguf writes Llama only")
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text()) \
        if (model_dir / "tokenizer_config.json").is_file() else {}
    if tok_json.get("model", {}).get("type") != "BPE":
        raise ModelLoadError(f"{model_dir}: export_llama_gguf needs a BPE tokenizer.json")
    n_head, n_layer = config["num_attention_heads"], config["num_hidden_layers"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    # Tokenizer: ids in order; added (special) tokens are control tokens.
    vocab = dict(tok_json["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    vocab.update(special)
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    if not merges:
        # llama.cpp refuses a BPE vocabulary without a merges list, and GGUF cannot store an empty
        # one: a single merge of two control bytes (whose result is no token) changes nothing.
        merges = ["\u0100 \u0100"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, adder in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                       ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        token = tok_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            adder(vocab[token])
    writer.add_add_bos_token(False)
    template = tok_config.get("chat_template")
    if not template and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)

    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    np_dtype = np.float32 if dtype == "f32" else np.float16
    for name, tensor in weights.items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = permute_rows(data, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            data = permute_rows(data, n_head, n_head_kv)
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        target = gguf_tensor_name(name, "llama", n_layer)
        if target is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ModelLoadError(f"{model_dir}: no GGUF name for {name}")
        # Norm vectors stay float32 (llama.cpp wants them so); matrices take the chosen type.
        writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32 if data.ndim == 1 else np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
