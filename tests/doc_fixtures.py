"""Real files for document tests and benchmarks: PDFs written by hand, DOCX through python-docx, bad files.

``make_pdf`` writes a valid PDF 1.4 (one Helvetica text object per page, a correct xref table), so
pypdf extracts each page's text. No PDF library is needed to write it; reportlab is not installed.
"""

from __future__ import annotations

import io
import textwrap
import zipfile
from pathlib import Path
from typing import Sequence


def _pdf_string(text: str) -> str:
    safe = text.encode("latin-1", "replace").decode("latin-1")
    return "(" + safe.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def pdf_bytes(pages: Sequence[str], *, title: str | None = None, width: int = 90) -> bytes:
    """A PDF with one page per string (lines wrapped at `width` characters)."""
    objects: list[bytes] = []

    def add(body: str | bytes) -> int:
        objects.append(body.encode("latin-1") if isinstance(body, str) else body)
        return len(objects)

    catalog = add("")  # filled in below, once the page ids are known
    pages_id = add("")
    font = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    for text in pages:
        lines = [l for para in text.split("\n") for l in (textwrap.wrap(para, width) or [""])]
        ops = ["BT", "/F1 10 Tf", "12 TL", "50 780 Td"]
        for line in lines[:60]:
            ops.append(f"{_pdf_string(line)} Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1", "replace")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(add(f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 612 842] "
                        f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {content} 0 R >>"))
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R >>".encode()
    objects[pages_id - 1] = (f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] "
                             f"/Count {len(kids)} >>").encode()
    info = add(f"<< /Title {_pdf_string(title)} >>") if title else None
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    trailer = f"<< /Size {len(objects) + 1} /Root {catalog} 0 R" + (f" /Info {info} 0 R" if info else "") + " >>"
    out.write(b"trailer\n" + trailer.encode() + b"\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def make_pdf(path: Path, pages: Sequence[str], *, title: str | None = None) -> Path:
    path.write_bytes(pdf_bytes(pages, title=title))
    return path


def make_encrypted_pdf(path: Path, pages: Sequence[str], password: str = "secret") -> Path:
    """The same PDF, encrypted with a user password (pypdf's writer)."""
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(pdf_bytes(pages)))
    writer = pypdf.PdfWriter()
    for page in reader.pages:
        writer.add_page(page)
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="AES-128")
    with open(path, "wb") as fh:
        writer.write(fh)
    return path


def make_docx(path: Path, paragraphs: Sequence[str], *, title: str | None = None,
              table: Sequence[Sequence[str]] | None = None) -> Path:
    """A real DOCX written by python-docx (a Title paragraph, then body paragraphs, then a table)."""
    import docx

    document = docx.Document()
    if title:
        document.add_heading(title, level=0)
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                grid.cell(r, c).text = cell
    document.save(str(path))
    return path


def rewrite_zip(src: Path, dest: Path, *, extra: dict[str, bytes] | None = None,
                replace: dict[str, bytes] | None = None) -> Path:
    """Copy a zip (a DOCX) adding or replacing members (to make macro or bomb variants)."""
    extra, replace = extra or {}, replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info.filename)))
        for name, data in extra.items():
            zout.writestr(name, data)
    return dest


def zip_bomb_docx(path: Path, inflated_bytes: int) -> Path:
    """A zip shaped like a DOCX whose one part inflates to `inflated_bytes` of zeros (a few hundred KB on disk)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        with zf.open("word/document.xml", "w", force_zip64=True) as fh:
            block = b"\0" * (1 << 20)
            for _ in range(inflated_bytes // len(block) + 1):
                fh.write(block)
    return path


def many_parts_docx(path: Path, parts: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        zf.writestr("word/document.xml", "<w:document/>")
        for i in range(parts):
            zf.writestr(f"word/media/p{i}.xml", "")
    return path


# Each bad input: (name it is uploaded as, how to make it, a fragment its one-line reason contains).
def bad_inputs(folder: Path, *, max_upload_bytes: int) -> list[tuple[str, str, Path, str]]:
    """(case, upload name, path, expected reason fragment) for every kind of bad file."""
    folder.mkdir(parents=True, exist_ok=True)
    good_pdf = pdf_bytes(["A page about volcanoes and lava flows.", "A second page about glaciers."])
    docx_ok = make_docx(folder / "ok.docx", ["A fine document."])
    cases = []

    def put(case, upload_name, data: bytes | None, expect, path: Path | None = None):
        p = path or folder / f"{case}.bin"
        if data is not None:
            p.write_bytes(data)
        cases.append((case, upload_name, p, expect))

    put("empty", "empty.txt", b"", "empty")
    put("binary", "photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "binary")
    put("binary-pdf", "random.pdf", bytes(range(256)) * 8, "broken PDF")
    put("truncated-pdf", "cut.pdf", good_pdf[: len(good_pdf) // 2], "broken PDF")
    make_encrypted_pdf(folder / "locked.pdf", ["top secret"])
    put("encrypted-pdf", "locked.pdf", None, "password", folder / "locked.pdf")
    put("encrypted-docx", "locked.docx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, "password")
    zip_bomb_docx(folder / "bomb.docx", 260 * 1024 * 1024)
    put("zip-bomb", "bomb.docx", None, "zip bomb", folder / "bomb.docx")
    many_parts_docx(folder / "parts.docx", 1001)
    put("zip-many-parts", "parts.docx", None, "zip bomb", folder / "parts.docx")
    put("docm", "macros.docm", docx_ok.read_bytes(), "macro")
    rewrite_zip(docx_ok, folder / "vba.docx", extra={"word/vbaProject.bin": b"\xd0\xcf\x11\xe0 fake vba"})
    put("docx-with-vba", "report.docx", None, "macros", folder / "vba.docx")
    put("traversal", "../../etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n", "'..'")
    put("unsupported", "tool.exe", b"MZ\x90\x00" + b"\0" * 64, "unsupported file type")
    put("too-big", "huge.txt", b"a" * (max_upload_bytes + 1), "over the limit")
    put("not-a-zip", "fake.docx", b"this is plain text, not a zip", "not a DOCX")
    return cases
