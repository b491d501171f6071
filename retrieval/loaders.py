"""Documents in: files and folders -> `Document`s with source, title and (for PDFs) pages.

Supported: plain text, Markdown, reStructuredText, HTML (visible text only), PDF (pypdf),
JSONL (one document per line, with a text field). Any file that cannot be loaded raises
`LoadSkip` whose message is the reason shown in the ingest report; callers skip it and go on.

Character offsets: a document's `text` is what chunk spans point into. For text and Markdown
files it is the decoded file itself, so a span is an exact position in the file; for HTML and
PDF it is the extracted text.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import LoadSkip

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".log"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES | JSONL_SUFFIXES

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
JSONL_TEXT_FIELDS = ("text", "content", "body")
JSONL_ID_FIELDS = ("id", "_id", "doc_id")
JSONL_SOURCE_FIELDS = ("url", "source")


@dataclass
class Document:
    """One document, ready to chunk.

    `pages` lists `(page_number, start, end)` character spans of `text`, 1-based pages, for PDFs
    only. `origin` is the file the document came from (a JSONL file holds many documents);
    re-adding that file replaces exactly the documents of that origin.
    """

    doc_id: str
    source: str
    title: str
    text: str
    content_hash: str
    origin: str
    kind: str
    pages: list[tuple[int, int, int]] = field(default_factory=list)


def make_doc_id(key: str) -> str:
    """A stable, short id from a source key (an absolute path, or `path#record-id`)."""
    return "d" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:15]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_files(
    paths: Iterable[str | os.PathLike],
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> Iterator[tuple[Path, str | None]]:
    """Yield `(path, skip_reason)` for every file under `paths`, recursively.

    Globs match the path relative to the folder given (POSIX separators) or the file name:
    `include=["*.md"]`, `exclude=["drafts/*", "*.min.html"]`. In folders, hidden entries and
    files of unsupported types are left out silently; a file named explicitly is always yielded
    (its loader reports why it cannot be read). A missing path yields a skip reason.
    """
    include = list(include or [])
    exclude = list(exclude or [])

    def matches(rel: str, name: str, globs: list[str]) -> bool:
        return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in globs)

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            yield p, "no such file or folder"
            continue
        if p.is_file():
            yield p.resolve(), None
            continue
        if not p.is_dir():
            yield p, "not a regular file or folder"
            continue
        root = p.resolve()
        for dirpath, dirnames, filenames in os.walk(root):
            # Sorted, so ingest order (and thus chunk ids) is deterministic.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if include and not matches(rel, name, include):
                    continue
                if exclude and matches(rel, name, exclude):
                    continue
                if full.suffix.lower() not in SUPPORTED_SUFFIXES:
                    continue
                yield full, None


def read_bytes_capped(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LoadSkip(f"cannot stat file: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise LoadSkip(f"file is {size:,} bytes, over the cap of {max_bytes:,} (raise max_file_bytes)")
    try:
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except OSError as exc:
        raise LoadSkip(f"unreadable: {exc.strerror or exc}") from exc


def decode_text(data: bytes) -> str:
    """Decode UTF-8 text; binary data raises `LoadSkip`."""
    if b"\x00" in data[:8192]:
        raise LoadSkip("binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoadSkip(f"not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc


_MD_HEADING = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FRONT_TITLE = re.compile(r"\A---\s*\n(?:.*\n)*?title:\s*[\"']?(.+?)[\"']?\s*\n(?:.*\n)*?---", re.MULTILINE)


def _markdown_title(text: str, fallback: str) -> str:
    m = _FRONT_TITLE.match(text)
    if m:
        return m.group(1).strip()
    m = _MD_HEADING.search(text)
    return m.group(1).strip() if m else fallback


_HTML_BLOCKS = (
    "p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "h1", "h2",
    "h3", "h4", "h5", "h6", "li", "ul", "ol", "table", "tr", "pre", "blockquote", "br", "hr",
    "dt", "dd", "figcaption", "title",
)


def html_to_text(html: str) -> tuple[str, str | None]:
    """Visible text of an HTML page (scripts, styles and templates dropped) and its title."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = None
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(" ", strip=True)
    for tag in soup(["script", "style", "noscript", "template", "head", "svg", "iframe"]):
        tag.decompose()
    # HTML whitespace collapses inside text; only block elements break paragraphs. Mark block
    # ends with a sentinel, collapse all whitespace, then turn sentinels into blank lines.
    mark = "\x00"
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_after(mark)
    raw = soup.get_text("").replace(mark + mark, mark)
    raw = re.sub(r"[\s\xa0]+", " ", raw)
    parts = [p.strip() for p in raw.split(mark)]
    text = "\n\n".join(p for p in parts if p)
    if title is None:
        h1 = soup.find("h1")
        if h1 is not None and h1.get_text(strip=True):
            title = h1.get_text(" ", strip=True)
    return text, title


def load_pdf(path: Path, data: bytes) -> tuple[str, str | None, list[tuple[int, int, int]]]:
    import io

    import pypdf
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception as exc:  # pypdf raises several types (DependencyError, ...)
                raise LoadSkip(f"encrypted PDF that cannot be opened: {exc}") from exc
            if not ok:
                raise LoadSkip("encrypted PDF (needs a password); decrypt it first")
        parts: list[str] = []
        pages: list[tuple[int, int, int]] = []
        pos = 0
        for number, page in enumerate(reader.pages, start=1):
            page_text = (page.extract_text() or "").strip()
            if not page_text:
                continue
            if parts:
                pos += 2  # the "\n\n" joining pages
            pages.append((number, pos, pos + len(page_text)))
            parts.append(page_text)
            pos += len(page_text)
        title = None
        try:
            meta = reader.metadata
            if meta is not None and meta.title and str(meta.title).strip():
                title = str(meta.title).strip()
        except Exception:
            title = None
    except LoadSkip:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise LoadSkip(f"broken PDF: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # pypdf surfaces many internal errors on malformed files
        raise LoadSkip(f"broken PDF: {type(exc).__name__}: {exc}") from exc
    if not parts:
        raise LoadSkip("PDF has no extractable text (scanned? OCR is not supported)")
    return "\n\n".join(parts), title, pages


def load_jsonl(path: Path, data: bytes) -> list[Document]:
    text = decode_text(data)
    origin = str(path)
    docs: list[Document] = []
    bad: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        if not isinstance(rec, dict):
            bad.append(lineno)
            continue
        body = next((rec[f] for f in JSONL_TEXT_FIELDS if isinstance(rec.get(f), str)), None)
        if body is None or not body.strip():
            bad.append(lineno)
            continue
        rid = next((str(rec[f]) for f in JSONL_ID_FIELDS if rec.get(f) not in (None, "")), str(lineno))
        source = next((str(rec[f]) for f in JSONL_SOURCE_FIELDS if rec.get(f)), f"{origin}#{rid}")
        title = str(rec.get("title") or "").strip()
        if title:
            # The title is searchable text too (BEIR convention: title + abstract).
            body = f"{title}\n\n{body}"
        docs.append(
            Document(
                doc_id=make_doc_id(f"{origin}#{rid}"),
                source=source,
                title=title or rid,
                text=body,
                content_hash=hashlib.sha256(body.encode("utf-8")).hexdigest(),
                origin=origin,
                kind="jsonl",
            )
        )
    if not docs:
        where = f" (bad lines: {bad[:5]})" if bad else ""
        raise LoadSkip(f"JSONL file has no record with a non-empty text field {JSONL_TEXT_FIELDS}{where}")
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise LoadSkip(f"JSONL file has duplicate record id for {d.source}; ids must be unique")
        seen.add(d.doc_id)
    return docs


def load_file(path: str | os.PathLike, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Document]:
    """Load one file into documents (one, or many for JSONL). Raises `LoadSkip` with a reason."""
    path = Path(path).resolve()
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise LoadSkip(
            f"unsupported file type {suffix or '(none)'!r}; supported: {' '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    data = read_bytes_capped(path, max_file_bytes)
    if not data.strip():
        raise LoadSkip("empty file")
    origin = str(path)
    if suffix in JSONL_SUFFIXES:
        return load_jsonl(path, data)
    pages: list[tuple[int, int, int]] = []
    if suffix in PDF_SUFFIXES:
        text, title, pages = load_pdf(path, data)
        kind = "pdf"
    elif suffix in HTML_SUFFIXES:
        text, title = html_to_text(decode_text(data))
        kind = "html"
    else:
        text = decode_text(data)
        kind = "markdown" if suffix in {".md", ".markdown"} else "text"
        title = _markdown_title(text, path.stem) if kind == "markdown" else None
    if not text.strip():
        raise LoadSkip("document has no text")
    return [
        Document(
            doc_id=make_doc_id(origin),
            source=origin,
            title=title or path.stem,
            text=text,
            content_hash=sha256_bytes(data),
            origin=origin,
            kind=kind,
            pages=pages,
        )
    ]
