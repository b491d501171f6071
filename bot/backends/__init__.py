"""Inference backends behind one engine interface, chosen by ``Settings.backend``.

Every backend is an object with the methods the transformers ``bot.engine.Engine`` has, and
every caller (Assistant, tools, API, UI, Slack, Discord, terminal, training jobs) uses only these:

    stream(messages=None, params=None, *, prompt_ids=None, adapter="base", cancel=None, tools=None)
        -> Iterator[Event]: TextDelta events, then exactly one Done (finish reason "stop", "length",
           "cancelled" or "error"; usage with token counts and time to first token). Raises
           RequestError/NotFoundError before streaming for bad input, BusyError when the queue is full.
           Setting ``cancel`` or closing the generator stops generation within one step.
    generate(messages, params, **kw) -> (text, Done)         the same, joined
    prompt_ids(messages, max_new_tokens, tools=None) -> ids  rendered and trimmed to fit (4xx if not)
    clamp(params) -> params                                   the server-side cap on reply length
    adapters: dict[name, source]; require_adapter(name); load_adapter(name, path); unload_adapter(name)
    model_name: str; tokenizer (Hugging Face, with apply_chat_template); health() -> dict; close()

The backends:
* ``transformers`` (``bot.engine.Engine``): the reference, and the path training uses.
* ``llama.cpp`` (``bot.backends.llamacpp.LlamaCppEngine``): GGUF files served directly, several
  chats batched through llama.cpp's batch API, PEFT adapters converted once to GGUF LoRA.
* ``openai`` (``bot.backends.openai_remote.OpenAIEngine``): any OpenAI-compatible server by URL
  (vLLM, llama-server, TGI, SGLang, Ollama, another Parley); adapters map to its model names.

``auto`` picks llama.cpp on a CPU when the model is a GGUF file (or the embedded default, which is
one) and llama-cpp-python imports; transformers otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bot.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "llama.cpp", "openai")

AUTO_PREFERS_LLAMACPP = True
"""Whether ``auto`` may pick llama.cpp (it does: the backend passes the contract suite,
tests/unit/test_backend_contract.py, and its embedded-model run)."""


def gguf_source(spec: str, home: Path) -> Path | None:
    """The GGUF file a model spec names: the embedded default's file, a ``.gguf`` path; else None."""
    from bot.models import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_gguf

    spec = (spec or DEFAULT_MODEL).strip()
    if spec in EMBEDDED_MODELS:
        return embedded_gguf(spec)
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist: check the --model path")
        return path
    return None


def _on_cpu(device: str) -> bool:
    """Whether ``device`` means a CPU here, without importing torch (seconds of start-up) on a
    machine that has no NVIDIA driver at all."""
    if device in ("cpu", "cuda"):
        return device == "cpu"
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in ("/proc/driver/nvidia/version",
                                                                          "/dev/nvidiactl")):
        return True
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


def resolve_backend(settings) -> str:
    """The backend ``settings.backend`` means here (``auto`` decided)."""
    if settings.backend != "auto":
        return settings.backend
    from bot.backends.llamacpp import available

    try:
        gguf = gguf_source(settings.model, settings.home)
    except ModelLoadError:
        gguf = None  # the transformers path reports a missing file with its own message
    if AUTO_PREFERS_LLAMACPP and gguf is not None and _on_cpu(settings.device) and available():
        return "llama.cpp"
    return "transformers"


def load_gguf_tokenizer(gguf: Path, home: Path, *, spec: str | None = None):
    """The Hugging Face tokenizer of a GGUF model (its vocabulary and chat template).

    Reuses the folder a transformers conversion wrote (PARLEY_HOME/models/NAME) when there is one;
    otherwise builds the tokenizer from the GGUF once (transformers' GGUF loader, tokenizer only:
    5-25 s) and caches it under PARLEY_HOME/models/NAME-tokenizer (later starts: under a second).
    """
    from filelock import FileLock
    from transformers import AutoTokenizer

    from bot.models import COMPLETE_MARKER, EMBEDDED_MODELS, _slug

    name = spec if spec in EMBEDDED_MODELS else _slug(gguf)
    converted = home / "models" / name
    if (converted / COMPLETE_MARKER).is_file():
        return _finish_tokenizer(AutoTokenizer.from_pretrained(converted), gguf)
    target = home / "models" / f"{name}-tokenizer"
    if not (target / COMPLETE_MARKER).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / COMPLETE_MARKER).is_file():
                tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                    tokenizer.save_pretrained(tmp)
                    (tmp / COMPLETE_MARKER).write_text(json.dumps(
                        {"source": str(gguf), "converted_at": time.time(), "format": "tokenizer"}, indent=2))
                    shutil.rmtree(target, ignore_errors=True)
                    os.replace(tmp, target)
                except Exception as exc:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise ModelLoadError(f"could not read the tokenizer of {gguf}: {exc}") from exc
    return _finish_tokenizer(AutoTokenizer.from_pretrained(target), gguf)


def _finish_tokenizer(tokenizer, source):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{source} has no chat template: pick an instruct/chat model")
    return tokenizer


def create_engine(settings, *, progress: bool = True) -> Any:
    """The engine ``settings`` ask for, loaded and ready (adapters are loaded by the caller)."""
    backend = resolve_backend(settings)
    common = dict(max_batch_size=settings.max_batch_size, max_new_tokens_cap=settings.max_new_tokens_cap,
                  max_time_s=settings.max_generation_time_s, context_window=settings.context_window,
                  queue_size=settings.queue_size)
    if backend == "transformers":
        from bot.engine import Engine
        from bot.models import load_model

        loaded = load_model(settings.model, settings.home, device=settings.device, dtype=settings.dtype,
                            progress=progress)
        return Engine(loaded, **common)
    if backend == "llama.cpp":
        from bot.backends.llamacpp import LlamaCppEngine

        gguf = gguf_source(settings.model, settings.home)
        if gguf is None:
            raise ConfigError(f"--backend llama.cpp serves GGUF files: --model {settings.model!r} is not one. Give "
                              f"a .gguf file or the embedded default, or use --backend transformers")
        if settings.device == "cuda":
            log.warning("this llama-cpp-python build decodes on the CPU; --device cuda is ignored")
        tokenizer = load_gguf_tokenizer(gguf, settings.home, spec=settings.model)
        return LlamaCppEngine(gguf, tokenizer, name=settings.model,
                              adapter_cache=settings.home / "cache" / "lora-gguf", **common)
    if backend == "openai":
        from bot.backends.openai_remote import OpenAIEngine

        # --model names the server's model; left at the default, the server's own base model serves.
        model = None if settings.model == _default_model() else settings.model
        return OpenAIEngine(settings.base_url, api_key=settings.backend_api_key, model=model,
                            tokenizer_spec=model, home=settings.home, **common)
    raise ConfigError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")


def _default_model() -> str:
    from bot.models import DEFAULT_MODEL

    return DEFAULT_MODEL
