"""The real embedded MiniLM on small real documents: right passage, exact citation span."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from retrieval import ChunkingConfig, EmbedderMismatchError, get_embedder, open_index  # noqa: E402

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "retrieval"
sys.path.insert(0, str(DATA))
from make_pdf import TWO_PAGES, make_pdf  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("lighthouse.md", "sourdough.html", "glaciers.txt"):
        shutil.copy(DATA / name, folder / name)
    (folder / "terns.pdf").write_bytes(make_pdf(TWO_PAGES, title="Arctic Tern Field Notes"))
    return folder


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory):
    # Small chunks so that each document has several and the right one must be picked.
    idx = open_index(tmp_path_factory.mktemp("idx") / "minilm", chunking=ChunkingConfig(chunk_tokens=48, overlap_tokens=8))
    report = idx.add_paths([corpus])
    assert not report.skipped, [(f.path, f.reason) for f in report.skipped]
    return idx


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
def test_paraphrased_question_finds_the_passage(index, corpus, mode):
    hits = index.search("Who was the last person to live at the station before automation?", k=3, mode=mode)
    top = hits[0]
    assert top.source == str(corpus / "lighthouse.md")
    assert "Margaret Innes" in top.text
    # The citation span is the exact passage in the file on disk.
    assert (corpus / "lighthouse.md").read_text(encoding="utf-8")[top.start:top.end] == top.text


def test_dense_understands_a_paraphrase_that_lexical_misses(index, corpus):
    query = "Who was the final keeper to live at the lighthouse?"
    assert "Margaret Innes" in index.search(query, k=1, mode="dense")[0].text
    assert "Margaret Innes" not in index.search(query, k=1, mode="lexical")[0].text


def test_html_passage_and_no_script_text(index, corpus):
    top = index.search("how hot should the oven be for bread", k=1)[0]
    assert top.title == "Baking Sourdough at Home"
    assert "250 degrees Celsius" in top.text
    assert not index.search("zebra telemetry tracking token", k=5, mode="lexical")


def test_pdf_passage_carries_its_page(index):
    top = index.search("how many banded chicks were found again in winter", k=1)[0]
    assert top.source.endswith("terns.pdf") and top.page == 2
    assert "31 were recovered" in top.text
    first = index.search("distance travelled by terns on their yearly migration", k=1)[0]
    assert first.page == 1 and "seventy thousand" in first.text


def test_chunks_fit_the_model_and_spans_are_exact(index, corpus):
    emb = index.embedder
    assert emb.name == "sentence-transformers/all-MiniLM-L6-v2" and emb.dim == 384
    text = (corpus / "glaciers.txt").read_text(encoding="utf-8")
    hits = [h for h in index.search("glacier ice firn moraine retreat", k=50) if h.source.endswith("glaciers.txt")]
    assert len(hits) >= 2
    for h in hits:
        assert text[h.start:h.end] == h.text
        assert len(emb.token_spans(h.text)) <= 48


def test_reopen_uses_the_recorded_embedder_once(index):
    again = open_index(index.root)
    assert again.embedder is index.embedder  # one model load per process
    assert again.search("sourdough starter feeding", k=1)[0].title == "Baking Sourdough at Home"
    with pytest.raises(EmbedderMismatchError):
        open_index(index.root, embedder="hash")


def test_model_loads_offline_from_the_package():
    emb = get_embedder()
    vec = emb.encode_query("offline")
    assert vec.shape == (384,) and abs(float((vec ** 2).sum()) - 1.0) < 1e-4
