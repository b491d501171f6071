"""/v1/collections: document collections over HTTP (the same library and rules as the Documents tab).

    GET    /v1/collections                                 yours, then the shared ones
    POST   /v1/collections                                 {"name": "manuals", "shared": false}
    GET    /v1/collections/{name}                          counts, size, embedder
    DELETE /v1/collections/{name}
    POST   /v1/collections/{name}/files[?shared=true]      multipart, one or many `files` parts -> 202 job
    GET    /v1/collections/{name}/jobs                     this owner's recent jobs, newest first
    GET    /v1/collections/{name}/jobs/{job_id}            per-file stages: queued loaded chunked embedded saved|failed
    POST   /v1/collections/{name}/jobs/{job_id}/retry      finish an interrupted job
    GET    /v1/collections/{name}/failures                 files that failed, with reason and hint
    GET    /v1/collections/{name}/documents
    DELETE /v1/collections/{name}/documents/{doc_id}
    POST   /v1/collections/{name}/documents/{doc_id}/reindex   -> 202 job
    POST   /v1/collections/{name}/reindex                  every file -> 202 job
    POST   /v1/collections/{name}/search                   {"query": "...", "k": 5}
    POST   /v1/collections/search                          {"query": "...", "collections": ["a", "b"], "k": 5}

Uploads stream to disk part by part (never held in memory); a file over ``max_upload_bytes``
stops the request with 413 and nothing from it is added. Who is asking comes from the auth
middleware (``identity_of``); what they cannot see is 404, a shared collection they may not
change is 403. See docs/documents.md.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from bot.errors import NotFoundError, RequestError, TooLargeError, UnsupportedMediaError
from bot.owners import ForbiddenError

MAX_FILES_PER_REQUEST = 1000
_FIELD_LIMIT = 4096

_NAME_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
CREATE = {"type": "object", "required": ["name"], "properties": {"name": _NAME_SCHEMA, "shared": {"type": "boolean"}}}
SEARCH = {"type": "object", "required": ["query"], "properties": {
    "query": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "maximum": 50}}}
SEARCH_MANY = {"type": "object", "required": ["query"], "properties": {
    **SEARCH["properties"], "collections": {"type": "array", "items": _NAME_SCHEMA}}}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
PayloadTooLargeError = TooLargeError


class _TooLarge(Exception):
    pass


class _StreamedUpload:
    """A multipart body written to temp files as it arrives (python-multipart's push parser).

    Each file part goes to its own file under ``folder``; at most ``max_file_bytes`` per file and
    ``MAX_FILES_PER_REQUEST`` files. Non-file fields are small strings.
    """

    def __init__(self, folder: Path, boundary: bytes, max_file_bytes: int):
        from python_multipart.multipart import MultipartParser

        self.folder = folder
        self.max_file_bytes = max_file_bytes
        self.files: list[tuple[str, Path]] = []
        self.fields: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._out = None
        self._size = 0
        self._name = ""
        self._field = bytearray()
        self._is_file = False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._hfield, "on_header_value": self._hvalue, "on_header_end": self._hend,
            "on_headers_finished": self._headers_done})

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def finish(self) -> None:
        self.parser.finalize()
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def _begin(self) -> None:
        self._disposition, self._is_file, self._size, self._field = b"", False, 0, bytearray()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _hend(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        _kind, options = parse_options_header(self._disposition)
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if len(self.files) >= MAX_FILES_PER_REQUEST:
                raise RequestError(f"more than {MAX_FILES_PER_REQUEST} files in one request: send them in parts")
            if field not in ("files", "file"):
                raise RequestError(f"file parts must be named 'files' (got {field[:40]!r}): "
                                   f"curl -F files=@notes.md")
            self._is_file = True
            self._name = options[b"filename"].decode("utf-8", "replace")
            path = self.folder / str(len(self.files))
            self._out = open(path, "wb")
            self.files.append((self._name, path))
        else:
            self._name = field

    def _data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._is_file:
            self._size += n
            if self._size > self.max_file_bytes:
                raise _TooLarge(self._name)
            self._out.write(data[start:end])
        else:
            if len(self._field) + n > _FIELD_LIMIT:
                raise RequestError(f"form field {self._name[:40]!r} is over {_FIELD_LIMIT} bytes")
            self._field.extend(data[start:end])

    def _end(self) -> None:
        if self._is_file:
            self.close()
        else:
            self.fields[self._name] = self._field.decode("utf-8", "replace")


def _clean_stale_uploads(folder: Path, older_than_s: float = 3600.0) -> None:
    """Remove temp files of uploads a killed server left behind (a running upload is never that old)."""
    import time

    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        try:
            if time.time() - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _flag(value: str | None, name: str) -> bool | None:
    if value is None or value == "":
        return None
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise RequestError(f"{name} must be true or false, not {value[:20]!r}")


def documents_router(runtime) -> APIRouter:
    """The /v1/collections routes over ``runtime.documents`` (a ``DocumentLibrary``)."""
    from bot.api import identity_of

    def checks(request: Request) -> None:
        # Cross-site writes: a web page may POST a multipart form (files) or an empty body to a
        # server on localhost without a CORS preflight; browsers name the page in Origin.
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if request.headers.get("sec-fetch-site") == "cross-site" or (
                    origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()):
                raise ForbiddenError(f"cross-site request from {str(origin)[:80]!r} refused: call the API from a "
                                     f"script or from this server's own pages")
        # A name with an encoded '/' would otherwise be read as another route ("a%2Fdocuments/x").
        raw = request.scope.get("raw_path", b"").decode("latin-1")
        if "%2f" in raw.lower() or "%5c" in raw.lower():
            from urllib.parse import unquote

            name = unquote(raw.split("/")[3]) if raw.count("/") >= 3 else raw
            raise RequestError(f"collection name {name[:80]!r} is not valid: use 1-64 letters, digits, '.', '_' "
                               f"or '-' (no '/', no '..')")

    router = APIRouter(tags=["documents"], dependencies=[Depends(checks)])
    if runtime.documents is not None:
        _clean_stale_uploads(runtime.documents.home / "tmp" / "uploads")
    settings = runtime.settings

    def library():
        if runtime.documents is None:
            raise NotFoundError("document collections are not available on this server")
        return runtime.documents

    async def run(fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def read_json(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise UnsupportedMediaError(f"send the body as JSON with 'Content-Type: application/json' "
                                        f"(got {kind[:60] or 'no Content-Type'})")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_request_bytes:
                raise PayloadTooLargeError(f"the request body is over {settings.max_request_bytes} bytes")
        try:
            data = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        return data

    def collection_dict(info, identity) -> dict[str, Any]:
        return {"object": "collection", **info.to_dict(), "writable": identity.admin or not info.shared}

    @router.get("/v1/collections", summary="List collections")
    async def list_collections(request: Request):
        """Your own collections, then the shared ones (what a chat can search)."""
        identity = identity_of(request)
        infos = await run(library().collections, identity.owner)
        return {"object": "list", "data": [collection_dict(i, identity) for i in infos]}

    @router.post("/v1/collections", status_code=201, summary="Create a collection", openapi_extra=_json_body(CREATE))
    async def create_collection(request: Request):
        """Body: {"name": "manuals", "shared": false}. Shared collections: admins only."""
        identity = identity_of(request)
        body = await read_json(request)
        shared = body.get("shared", False)
        if not isinstance(shared, bool):
            raise RequestError("shared must be true or false")
        info = await run(library().create, identity, body.get("name"), shared=shared)
        return collection_dict(info, identity)

    @router.post("/v1/collections/search", summary="Search several collections", openapi_extra=_json_body(SEARCH_MANY))
    async def search_many(request: Request):
        """Body: {"query": "...", "collections": ["a", "b"] (default: all you can see), "k": 5}."""
        identity = identity_of(request)
        body = await read_json(request)
        names = body.get("collections") or []
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError("collections must be a list of collection names")
        return await _search(identity, names, body)

    async def _search(identity, names, body):
        k = body.get("k", 5)
        query = body.get("query")
        passages = await run(library().search, identity.owner, names, query, k)
        return {"object": "list", "query": query, "data": passages}

    @router.get("/v1/collections/{name}", summary="One collection")
    async def get_collection(name: str, request: Request):
        identity = identity_of(request)
        info = await run(library().collection, identity.owner, name)
        return collection_dict(info, identity)

    @router.delete("/v1/collections/{name}", summary="Delete a collection")
    async def delete_collection(name: str, request: Request):
        """Deletes the collection with all its documents and kept originals."""
        return await run(library().delete_collection, identity_of(request), name)

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more files; a part's filename may be a relative "
                                                "path (docs/intro.md)"}}}}}}}

    @router.post("/v1/collections/{name}/files", status_code=202, summary="Upload files",
                 openapi_extra=upload_body)
    async def upload(name: str, request: Request, shared: str | None = None):
        """Multipart upload of one or many `files` parts; returns the job (poll .../jobs/{id}).

        Each file is streamed to disk and may be at most max_upload_bytes (else 413, nothing from
        the request is added). The collection is created if needed (your own; `?shared=true`
        for a shared one, admins only)."""
        identity = identity_of(request)
        lib = library()
        want_shared = _flag(shared, "shared")
        target, to_shared = await run(lib.upload_target, identity, name, shared=want_shared)
        content_type = request.headers.get("content-type", "")
        from python_multipart.multipart import parse_options_header

        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise RequestError("send the files as multipart/form-data, e.g. curl -F files=@notes.md -F files=@a.pdf")
        folder = lib.home / "tmp" / "uploads" / secrets.token_hex(8)
        folder.mkdir(parents=True, exist_ok=True)
        parser = _StreamedUpload(folder, boundary, lib.max_upload_bytes)
        try:
            try:
                async for chunk in request.stream():
                    if chunk:
                        await asyncio.to_thread(parser.write, chunk)
                await asyncio.to_thread(parser.finish)
            except _TooLarge as exc:
                raise PayloadTooLargeError(
                    f"{str(exc)[:120]!r} is over the upload limit of {lib.max_upload_bytes:,} bytes: nothing from "
                    f"this request was added and the collection is unchanged; split the file or ask the admin to "
                    f"raise max_upload_bytes") from None
            except RequestError:
                raise
            except Exception as exc:  # python-multipart's parse errors, a client that went away
                raise RequestError(f"the multipart body could not be read ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:160]}): send it again") from None
            finally:
                parser.close()
            if not parser.files:
                raise RequestError("no files in the request: attach them as 'files' parts "
                                   "(curl -F files=@notes.md)")
            job = await run(lib.upload, identity, target, parser.files, shared=to_shared, move=True)
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        return JSONResponse(job.to_dict(), status_code=202)

    @router.get("/v1/collections/{name}/jobs", summary="Upload jobs")
    async def list_jobs(name: str, request: Request):
        identity = identity_of(request)
        jobs = await run(library().jobs, identity.owner, name)
        return {"object": "list", "data": [j.to_dict() for j in jobs]}

    @router.get("/v1/collections/{name}/jobs/{job_id}", summary="One upload job")
    async def get_job(name: str, job_id: str, request: Request):
        """Per-file stage (queued, loaded, chunked, embedded, saved or failed with reason and hint)."""
        identity = identity_of(request)
        await run(library().collection, identity.owner, name)
        job = await run(library().job, identity.owner, job_id)
        if job.collection != name:
            raise NotFoundError(f"no upload job {job_id!r} in collection {name!r}")
        return job.to_dict()

    @router.post("/v1/collections/{name}/jobs/{job_id}/retry", status_code=202, summary="Retry a job")
    async def retry_job(name: str, job_id: str, request: Request):
        """Finish the files an interrupted job (or a busy index) left unfinished."""
        job = await run(library().retry, identity_of(request), name, job_id)
        return JSONResponse(job.to_dict(), status_code=202)

    @router.get("/v1/collections/{name}/failures", summary="Files that failed")
    async def failures(name: str, request: Request):
        identity = identity_of(request)
        files = await run(library().failures, identity.owner, name)
        return {"object": "list", "data": [f.public() for f in files]}

    @router.get("/v1/collections/{name}/documents", summary="Documents of a collection")
    async def list_documents(name: str, request: Request):
        identity = identity_of(request)
        docs = await run(library().documents, identity.owner, name)
        return {"object": "list", "data": [d.to_dict() for d in docs]}

    @router.delete("/v1/collections/{name}/documents/{doc_id}", summary="Remove a document")
    async def remove_document(name: str, doc_id: str, request: Request):
        return await run(library().remove, identity_of(request), name, doc_id)

    @router.post("/v1/collections/{name}/documents/{doc_id}/reindex", status_code=202, summary="Re-index a document")
    async def reindex_document(name: str, doc_id: str, request: Request):
        job = await run(library().reindex, identity_of(request), name, doc_id)
        return JSONResponse(job.to_dict(), status_code=202)

    @router.post("/v1/collections/{name}/reindex", status_code=202, summary="Re-index every document")
    async def reindex_all(name: str, request: Request):
        job = await run(library().reindex, identity_of(request), name, None)
        return JSONResponse(job.to_dict(), status_code=202)

    @router.post("/v1/collections/{name}/search", summary="Search one collection", openapi_extra=_json_body(SEARCH))
    async def search_one(name: str, request: Request):
        """Body: {"query": "...", "k": 5}; passages best first with title, page, span and score."""
        identity = identity_of(request)
        body = await read_json(request)
        return await _search(identity, [name], body)

    @router.api_route("/v1/collections/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                      include_in_schema=False)
    async def unknown(rest: str, request: Request):
        raise NotFoundError(f"no such endpoint {request.method} /v1/collections/{rest[:80]}: see /docs "
                            f"(collection names cannot contain '/')")

    return router
