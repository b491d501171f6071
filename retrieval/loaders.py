"""Documents in: files and folders -> `Document`s with source, title and (for PDFs) pages.

Supported: plain text, Markdown, reStructuredText, HTML (visible text only), PDF (pypdf),
DOCX (python-docx), JSONL (one document per line, with a text field). Any file that cannot be
loaded raises `LoadSkip` whose message is the reason shown in the ingest report (one line that
says what is wrong and how to fix it); callers skip it and go on.

Untrusted files are bounded before they are parsed: a DOCX is a zip, so its member count and
inflated size are checked from the zip directory first (a zip bomb is refused without inflating
it), macro-enabled Word files are refused, PDFs are limited in pages and extracted text, and a
folder walk never follows a symbolic link out of the folder.

Character offsets: a document's `text` is what chunk spans point into. For text and Markdown
files it is the decoded file itself, so a span is an exact position in the file; for HTML and
PDF it is the extracted text.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import LoadSkip

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".log"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
DOCX_SUFFIXES = {".docx"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES | JSONL_SUFFIXES | DOCX_SUFFIXES

# Types people try that are refused with a specific reason rather than "unsupported".
_MACROS = "macro-enabled Office file: files with macros are refused; save it as .docx (Word removes the macros)"
REFUSED_SUFFIXES = {
    ".docm": _MACROS, ".dotm": _MACROS, ".xlsm": _MACROS, ".pptm": _MACROS,
    ".doc": "old Word format (.doc) is not supported: save it as .docx",
    ".dot": "old Word template (.dot) is not supported: save it as .docx",
}

# Bounds for untrusted archives and PDFs (a 50 MB upload must not become gigabytes in memory).
DOCX_MAX_MEMBERS = 1000
DOCX_MAX_INFLATED_BYTES = 256 * 1024 * 1024
PDF_MAX_PAGES = 5000
MAX_TEXT_CHARS = 50_000_000
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # Compound File: encrypted OOXML, or old .doc

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

    Symbolic links inside a folder are never followed out of it: a link (to a file or a folder)
    that resolves outside the folder, or nowhere, yields a skip reason; a link to a file inside
    the folder yields that file (once). Links to folders are not descended into (their target,
    if inside, is walked anyway). A path named explicitly is the user's choice and is followed.
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
        for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: links are checked below
            # Sorted, so ingest order (and thus chunk ids) is deterministic.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in dirnames:
                full = Path(dirpath) / name
                if full.is_symlink():
                    reason = _outside_link(full, root)
                    if reason:
                        yield full, reason
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
                if full.is_symlink():
                    reason = _outside_link(full, root)
                    if reason:
                        yield full, reason
                        continue
                    full = full.resolve()
                yield full, None


def _outside_link(link: Path, root: Path) -> str | None:
    """Why a symbolic link under `root` is not followed, or None when it stays inside `root`."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target, or a loop
        return "broken symbolic link: not followed"
    if target != root and root not in target.parents:
        return f"symbolic link to {target}, outside the folder: not followed (copy the file in instead)"
    return None


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
        if len(reader.pages) > PDF_MAX_PAGES:
            raise LoadSkip(f"PDF has {len(reader.pages):,} pages, over the limit of {PDF_MAX_PAGES:,}: split it")
        parts: list[str] = []
        pages: list[tuple[int, int, int]] = []
        pos = 0
        for number, page in enumerate(reader.pages, start=1):
            page_text = (page.extract_text() or "").strip()
            if not page_text:
                continue
            if pos + len(page_text) > MAX_TEXT_CHARS:
                raise LoadSkip(f"PDF text is over {MAX_TEXT_CHARS:,} characters (by page {number}): split it")
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
        raise LoadSkip(f"broken PDF ({_one_line(exc)}): the file is damaged or cut off; export it again") from exc
    except Exception as exc:  # pypdf surfaces many internal errors on malformed files (LimitReachedError...)
        raise LoadSkip(f"broken PDF ({_one_line(exc)}): the file is damaged or cut off; export it again") from exc
    if not parts:
        raise LoadSkip("PDF has no extractable text (scanned? OCR is not supported)")
    return "\n\n".join(parts), title, pages


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _zip_entry_count(data: bytes) -> int | None:
    """Entries declared in a zip's end-of-central-directory record (None when not found)."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if at < 0 or at + 22 > len(data):
        return None
    return struct.unpack_from("<H", data, at + 10)[0]


def check_office_zip(data: bytes, what: str = "DOCX", max_members: int = DOCX_MAX_MEMBERS,
                     max_inflated: int = DOCX_MAX_INFLATED_BYTES) -> zipfile.ZipFile:
    """Open an Office (OOXML) zip only when it is safe to parse; raises `LoadSkip` otherwise.

    Refused: an encrypted (password-protected) or old binary file, anything that is not a zip,
    a damaged zip, more than `max_members` parts or more than `max_inflated` bytes once inflated
    (both read from the zip directory, before anything is inflated; zipfile never inflates a
    member past its declared size), encrypted members, and macros (vbaProject.bin or a
    macro-enabled content type).
    """
    if data[:8] == _OLE_MAGIC:
        raise LoadSkip(f"password-protected (encrypted) or old-format Word file: remove the password, "
                       f"or save it as .docx")
    if not data.startswith(b"PK"):
        raise LoadSkip(f"not a {what} file (not a zip archive): save it from Word as .docx")
    declared = _zip_entry_count(data)
    if declared is not None and declared != 0xFFFF and declared > max_members:
        raise LoadSkip(f"{what} has {declared:,} parts, over the limit of {max_members:,} (a zip bomb?): refused")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise LoadSkip(f"broken {what} ({_one_line(exc)}): the file is damaged or cut off; save it again") from exc
    if len(infos) > max_members:
        raise LoadSkip(f"{what} has {len(infos):,} parts, over the limit of {max_members:,} (a zip bomb?): refused")
    inflated = sum(i.file_size for i in infos)
    if inflated > max_inflated:
        raise LoadSkip(f"{what} would inflate to {inflated:,} bytes, over the limit of {max_inflated:,} "
                       f"(a zip bomb?): refused")
    if any(i.flag_bits & 0x1 for i in infos):
        raise LoadSkip(f"{what} has encrypted parts: remove the password and save it again")
    names = {i.filename.lower() for i in infos}
    if any(n.rsplit("/", 1)[-1] in ("vbaproject.bin", "vbadata.xml") for n in names):
        raise LoadSkip(f"{what} contains macros (vbaProject.bin): files with macros are refused; save it as a "
                       f"plain .docx")
    if "[content_types].xml" in names:
        try:
            types = zf.read("[Content_Types].xml")
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
            raise LoadSkip(f"broken {what} ({_one_line(exc)}): the file is damaged; save it again") from exc
        if b"macroenabled" in types.lower():
            raise LoadSkip(f"{what} is macro-enabled: files with macros are refused; save it as a plain .docx")
    return zf


def load_docx(path: Path, data: bytes) -> tuple[str, str | None]:
    """Paragraphs and tables of a DOCX, in document order, and its title."""
    check_office_zip(data)
    try:
        import docx
        from docx.table import Table
        from docx.text.paragraph import Paragraph

        document = docx.Document(io.BytesIO(data))
        parts: list[str] = []
        title = None
        body = document.element.body
        for child in body.iterchildren():
            tag = child.tag.rsplit("}", 1)[-1]
            if tag == "p":
                para = Paragraph(child, document)
                text = para.text.strip()
                if not text:
                    continue
                style = (para.style.name if para.style is not None else "") or ""
                if title is None and style in ("Title", "Heading 1"):
                    title = text
                parts.append(text)
            elif tag == "tbl":
                for row in Table(child, document).rows:
                    cells = [" ".join(c.text.split()) for c in row.cells]
                    line = " | ".join(dict.fromkeys(c for c in cells if c))
                    if line:
                        parts.append(line)
            if sum(len(p) for p in parts) > MAX_TEXT_CHARS:
                raise LoadSkip(f"DOCX text is over {MAX_TEXT_CHARS:,} characters: split it")
        core_title = (document.core_properties.title or "").strip()
    except LoadSkip:
        raise
    except Exception as exc:  # python-docx / lxml raise many types on malformed parts
        raise LoadSkip(f"broken DOCX ({_one_line(exc)}): the file is damaged; open and save it again in Word") from exc
    if not parts:
        raise LoadSkip("DOCX has no text (only images or empty?)")
    return "\n\n".join(parts), core_title or title


def load_jsonl(path: Path, data: bytes, origin: str | None = None) -> list[Document]:
    text = decode_text(data)
    origin = origin or str(path)
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


def load_file(path: str | os.PathLike, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, *,
              key: str | None = None) -> list[Document]:
    """Load one file into documents (one, or many for JSONL). Raises `LoadSkip` with a reason.

    key: the name the documents are known by (their origin, source and id), e.g. the name an
        uploaded file had on the uploader's machine; default: the file's resolved path. The type
        is always taken from `path`'s suffix.
    """
    path = Path(path).resolve()
    suffix = path.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise LoadSkip(REFUSED_SUFFIXES[suffix])
    if suffix not in SUPPORTED_SUFFIXES:
        raise LoadSkip(
            f"unsupported file type {suffix or '(none)'!r}; supported: {' '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    data = read_bytes_capped(path, max_file_bytes)
    if not data.strip():
        raise LoadSkip("empty file")
    origin = key or str(path)
    if suffix in JSONL_SUFFIXES:
        return load_jsonl(path, data, origin)
    pages: list[tuple[int, int, int]] = []
    if suffix in PDF_SUFFIXES:
        text, title, pages = load_pdf(path, data)
        kind = "pdf"
    elif suffix in DOCX_SUFFIXES:
        text, title = load_docx(path, data)
        kind = "docx"
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
            title=title or Path(origin).stem,
            text=text,
            content_hash=sha256_bytes(data),
            origin=origin,
            kind=kind,
            pages=pages,
        )
    ]
