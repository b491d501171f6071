"""Shared fixtures: an isolated PARLEY_HOME, the tiny model, and tier markers by folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TIERS = ("unit", "integration", "e2e", "gpu")


def pytest_collection_modifyitems(config, items):
    """Tests get their tier marker from their folder; GPU tests skip without CUDA."""
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing entirely: nothing GPU can run
        has_cuda = False
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def parley_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "parley-home"
    home.mkdir()
    monkeypatch.setenv("PARLEY_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama with a byte-level tokenizer and SmolLM2's chat template."""
    from tests.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory) -> Path:
    """A PARLEY_HOME shared by integration tests, with the embedded model converted once.

    Set PARLEY_TEST_HOME to reuse a converted model between runs (CI sets it to a cache folder).
    """
    from bot.models import resolve_model

    home = Path(os.environ.get("PARLEY_TEST_HOME") or tmp_path_factory.mktemp("embedded-home"))
    resolve_model("smollm2-135m", home, progress=False)
    return home
