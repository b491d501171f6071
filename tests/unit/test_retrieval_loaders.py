"""Loaders: each supported type, folder walks with globs, and every kind of bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from retrieval import LoadSkip, iter_files, load_file

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data" / "retrieval"
sys.path.insert(0, str(DATA))
from make_pdf import TWO_PAGES, make_pdf  # noqa: E402


def test_markdown_keeps_file_text_and_title():
    doc = load_file(DATA / "lighthouse.md")[0]
    assert doc.title == "Keepers of the Lighthouse"
    assert doc.text == (DATA / "lighthouse.md").read_text(encoding="utf-8")
    assert doc.source == str((DATA / "lighthouse.md").resolve())
    assert doc.kind == "markdown" and doc.pages == []


def test_html_drops_scripts_and_styles_and_collapses_whitespace():
    doc = load_file(DATA / "sourdough.html")[0]
    assert doc.title == "Baking Sourdough at Home"
    assert "zebra-telemetry" not in doc.text and "injected-script-text" not in doc.text
    assert "font-family" not in doc.text
    assert "kept alive in flour and water. Feed the starter" in doc.text
    assert "\n\nShaping and proofing\n\n" in doc.text


def test_pdf_pages_and_title(tmp_path):
    path = tmp_path / "terns.pdf"
    path.write_bytes(make_pdf(TWO_PAGES, title="Tern Notes"))
    doc = load_file(path)[0]
    assert doc.title == "Tern Notes"
    assert [p for p, _, _ in doc.pages] == [1, 2]
    (_, a1, b1), (_, a2, b2) = doc.pages
    assert "seventy thousand kilometres" in doc.text[a1:b1]
    assert "thirty-four years earlier" in doc.text[a2:b2]


def test_jsonl_one_document_per_record(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"id": "a", "title": "Alpha", "text": "first record"},
            {"id": "b", "text": "second record", "url": "https://example.org/b"},
            {"id": "c", "text": ""}, "not an object"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    docs = load_file(path)
    assert [d.title for d in docs] == ["Alpha", "b"]
    assert docs[0].text == "Alpha\n\nfirst record"
    assert docs[1].source == "https://example.org/b"
    assert docs[0].doc_id != docs[1].doc_id
    assert {d.origin for d in docs} == {str(path.resolve())}


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("blob.txt", b"\x00\x01\x02binary", "binary"),
        ("latin.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("empty.md", b"  \n\n ", "empty"),
        ("data.xlsx", b"PK\x03\x04", "unsupported file type"),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "PDF"),
        ("blank.html", b"<html><script>x=1</script></html>", "no text"),
        ("empty.jsonl", b'{"title": "no text field"}\n', "no record"),
    ],
)
def test_bad_inputs_are_skipped_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LoadSkip, match=reason):
        load_file(path)


def test_size_cap(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * 1000)
    with pytest.raises(LoadSkip, match="over the cap"):
        load_file(path, max_file_bytes=100)
    assert load_file(path, max_file_bytes=10_000)


def test_encrypted_pdf_is_skipped(tmp_path):
    import io

    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(TWO_PAGES))))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    path = tmp_path / "locked.pdf"
    with open(path, "wb") as fh:
        writer.write(fh)
    with pytest.raises(LoadSkip, match="encrypted"):
        load_file(path)


def test_folder_walk_with_globs(tmp_path):
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "sub" / "c.md").write_text("c")
    (tmp_path / "drafts").mkdir()
    (tmp_path / "drafts" / "d.md").write_text("d")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.md").write_text("e")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")

    def names(**kw):
        return sorted(p.name for p, reason in iter_files([tmp_path], **kw) if reason is None)

    assert names() == ["a.md", "b.txt", "c.md", "d.md"]
    assert names(include=["*.md"]) == ["a.md", "c.md", "d.md"]
    assert names(include=["*.md"], exclude=["drafts/*"]) == ["a.md", "c.md"]
    missing = list(iter_files([tmp_path / "nope"]))
    assert missing[0][1] == "no such file or folder"
