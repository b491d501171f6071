"""Merge a LoRA adapter into its base model and write an ordinary model folder.

    parley finetune merge ADAPTER --output DIR [--model BASE] [--dtype auto|float32|bfloat16]

The merged folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and with
``parley chat --model DIR``; it records the base and the adapter it came from in parley_merged.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from finetune import runs
from finetune.errors import FinetuneError

log = logging.getLogger("finetune")


def resolve_adapter(adapter: str | Path, home: Path) -> Path:
    """A folder path, or a bare NAME of an adapter in PARLEY_HOME/adapters."""
    path = Path(adapter).expanduser()
    named = Path(home) / "adapters" / str(adapter)
    if not path.exists() and "/" not in str(adapter) and named.exists():
        path = named
    from bot.errors import ModelLoadError
    from bot.models import validate_adapter_dir

    try:
        return validate_adapter_dir(path)
    except ModelLoadError as exc:
        raise FinetuneError(str(exc)) from None


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: parley_adapter.json's spec, else adapter_config's."""
    facts = adapter_dir / "parley_adapter.json"
    if facts.is_file():
        spec = json.loads(facts.read_text()).get("base_model", {}).get("spec")
        if spec:
            return spec
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise FinetuneError(f"{adapter_dir} does not say which base model it belongs to: pass --model")
    return base


def load_base_and_adapter(adapter_dir: Path, home: Path, model: str | None, *, device: str = "cpu",
                          dtype: str = "float32"):
    """(PeftModel, tokenizer, base spec) with the adapter active under the name 'adapter'."""
    from peft import PeftModel

    from bot.models import load_model

    spec = model or adapter_base(adapter_dir)
    loaded = load_model(spec, home, device=device, dtype=dtype, progress=False)
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), adapter_name="adapter")
    peft_model.eval()
    return peft_model, loaded.tokenizer, spec


def merge_adapter(adapter: str | Path, output: str | Path, *, home: Path, model: str | None = None,
                  dtype: str = "auto", overwrite: bool = False) -> Path:
    import torch

    adapter_dir = resolve_adapter(adapter, home)
    output = Path(output).expanduser()
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FinetuneError(f"{output} exists and is not empty: choose another --output or pass --overwrite")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise FinetuneError(f"--dtype {dtype!r}: use auto, float32 or bfloat16")
    peft_model, tokenizer, spec = load_base_and_adapter(adapter_dir, home, model,
                                                        dtype="float32" if dtype == "auto" else dtype)
    merged = peft_model.merge_and_unload()
    bad = [n for n, p in merged.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise FinetuneError(f"the merged weights have non-finite values in {bad[:3]}; the adapter is broken")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "parley_merged.json").write_text(json.dumps({
        "base_model": spec, "adapter": str(adapter_dir.resolve()), "merged_at": time.time(),
        "dtype": str(next(merged.parameters()).dtype)}, indent=2))
    output.parent.mkdir(parents=True, exist_ok=True)
    runs.replace_dir(tmp, output)  # the old folder is removed only once the new one is in place
    log.info("merged %s into %s -> %s", adapter_dir, spec, output)
    return output
