"""Build the running pieces from Settings: model -> engine -> tools -> assistant, and the store.

Front ends (CLI chat, server, Slack, Discord) call ``build_runtime`` once at start-up.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.assistant import Assistant
from bot.backends import create_engine
from bot.config import Settings
from bot.engine import Engine
from bot.jobs import TrainingJobs
from bot.owners import Access
from bot.store import Store

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    store: Store
    assistant: Assistant
    jobs: TrainingJobs
    load_seconds: float
    access: Access = field(default_factory=Access)
    """Who may do what (bot/owners.py)."""
    documents: Any = None
    """The document collections (bot/documents.py ``DocumentLibrary``), shared by the search tool,
    the Documents tab and /v1/collections."""


def discover_adapters(home: Path) -> dict[str, str]:
    """Adapters saved under PARLEY_HOME/adapters/NAME (fine-tuning writes them there)."""
    root = home / "adapters"
    if not root.is_dir():
        return {}
    # Names starting with "." are fine-tuning's own staging and backup folders (.NAME.staging,
    # .NAME.old): complete-looking for a moment during an --overwrite swap, never to be served.
    return {p.name: str(p) for p in sorted(root.iterdir())
            if not p.name.startswith(".") and (p / "adapter_config.json").is_file()
            and (p / "adapter_model.safetensors").is_file()}


def build_tools(engine: Engine, settings: Settings, documents=None):
    """The tool runner when bot.tools is available; None keeps the assistant a plain chat."""
    try:
        from bot.tools.runner import build_tool_runner
    except ImportError:
        return None
    runner = build_tool_runner(engine, settings.home, documents=documents)
    # Load the router's embedder in the background: start-up stays fast, the first turn is not slow.
    threading.Thread(target=runner.warm, name="tools-warm", daemon=True).start()
    return runner


def build_runtime(settings: Settings, *, progress: bool = True, with_tools: bool = True,
                  auto_adapters: bool = True) -> Runtime:
    started = time.perf_counter()
    # settings.backend picks transformers, llama.cpp or an OpenAI-compatible server (bot/backends).
    engine = create_engine(settings, progress=progress)
    adapters = {**(discover_adapters(settings.home) if auto_adapters else {}), **settings.adapters}
    for name, path in adapters.items():
        try:
            engine.load_adapter(name, path)
        except Exception as exc:
            if name in settings.adapters:  # named explicitly: a failure is the user's to fix now
                raise
            log.warning("skipping adapter %s in %s: %s", name, path, exc)
    store = Store(settings.db_path)
    from bot.documents import DocumentLibrary

    # One library for the process: the search tool, the Documents tab and /v1/collections share it.
    documents = DocumentLibrary(settings.home, max_upload_bytes=settings.max_upload_bytes,
                                embedder=getattr(settings, "embedder", None))
    tools = build_tools(engine, settings, documents) if with_tools else None
    assistant = Assistant(engine, store=store, system_prompt=settings.system_prompt, tools=tools)
    return Runtime(settings=settings, engine=engine, store=store, assistant=assistant,
                   jobs=TrainingJobs(engine, settings.home, settings.model),
                   load_seconds=time.perf_counter() - started, access=Access.from_settings(settings),
                   documents=documents)
