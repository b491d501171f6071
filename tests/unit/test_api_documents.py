"""/v1/collections on a real uvicorn server over the tiny model, with tools: upload, progress, list,
remove, re-index, search, bad input, limits, ownership, and the chat searching what was uploaded."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from bot.api import create_app
from tests.doc_fixtures import bad_inputs, make_docx, make_pdf
from tests.helpers import build_test_runtime, running_server

KEYS = {"alice": "alice-key-1", "bob": "bob-key-2", "root": "root-key-3"}
LIMIT = 2_000_000


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("docs-api-home")
    runtime = build_test_runtime(tiny_model_dir, home, api_keys=",".join(f"{u}:{k}" for u, k in KEYS.items()),
                                 admins="root", max_upload_bytes=LIMIT, max_new_tokens_cap=8)
    runtime.documents.embedder = "hash"  # new collections use the fast embedder (no model files)
    with running_server(create_app(runtime, with_ui=False)) as url:
        yield url, runtime
    runtime.engine.close()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    (folder / "cats.md").write_text("# Cats\n\nCats sleep sixteen hours a day. A purring cat is content.\n")
    make_pdf(folder / "earth.pdf", ["Volcanoes erupt when magma rises.", "Glaciers carve valleys over centuries."])
    make_docx(folder / "report.docx", ["Quarterly revenue grew by ten percent."], title="Q3 report")
    return folder


def h(user):
    return {"Authorization": f"Bearer {KEYS[user]}"}


def api(url, user, method, path, **kw):
    return httpx.request(method, url + path, headers={**h(user), **kw.pop("headers", {})}, timeout=60, **kw)


def upload(url, user, name, files, **params):
    parts = [("files", (n, Path(p).read_bytes() if isinstance(p, (str, Path)) else p)) for n, p in files]
    return httpx.post(f"{url}/v1/collections/{name}/files", files=parts, headers=h(user), params=params, timeout=60)


def wait(url, user, name, job_id, timeout=60):
    deadline = time.time() + timeout
    while True:
        job = api(url, user, "GET", f"/v1/collections/{name}/jobs/{job_id}").json()
        if job["state"] in ("done", "interrupted"):
            return job
        assert time.time() < deadline, job
        time.sleep(0.1)


def test_upload_progress_list_search_remove_reindex(server, src):
    url, _runtime = server
    r = upload(url, "alice", "notes", [("cats.md", src / "cats.md"), ("papers/earth.pdf", src / "earth.pdf"),
                                       ("report.docx", src / "report.docx")])
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["object"] == "upload_job" and job["collection"] == "notes" and not job["shared"]
    assert [f["stage"] for f in job["files"]] == ["queued"] * 3
    job = wait(url, "alice", "notes", job["id"])
    assert [(f["name"], f["stage"]) for f in job["files"]] == [
        ("cats.md", "saved"), ("papers/earth.pdf", "saved"), ("report.docx", "saved")]
    assert all(set(f["times"]) >= {"queued", "loaded", "chunked", "embedded", "saved"} for f in job["files"])
    assert "path" not in job["files"][0]  # server paths never leave the server
    listed = api(url, "alice", "GET", "/v1/collections").json()["data"]
    assert [(c["name"], c["shared"], c["documents"], c["writable"]) for c in listed] == [("notes", False, 3, True)]
    docs = {d["source"]: d for d in api(url, "alice", "GET", "/v1/collections/notes/documents").json()["data"]}
    assert set(docs) == {"cats.md", "papers/earth.pdf", "report.docx"}
    assert docs["papers/earth.pdf"]["chunks"] == 2 and docs["papers/earth.pdf"]["bytes"] > 0
    hits = api(url, "alice", "POST", "/v1/collections/notes/search", json={"query": "glaciers valleys", "k": 2}).json()
    assert hits["data"][0]["source"] == "papers/earth.pdf" and hits["data"][0]["page"] == 2
    many = api(url, "alice", "POST", "/v1/collections/search", json={"query": "revenue", "collections": ["notes"]})
    assert many.json()["data"][0]["source"] == "report.docx"
    r = api(url, "alice", "DELETE", f"/v1/collections/notes/documents/{docs['cats.md']['doc_id']}")
    assert r.status_code == 200 and r.json()["removed_chunks"] == docs["cats.md"]["chunks"]
    r = api(url, "alice", "POST", f"/v1/collections/notes/documents/{docs['report.docx']['doc_id']}/reindex")
    assert r.status_code == 202
    assert [f["stage"] for f in wait(url, "alice", "notes", r.json()["id"])["files"]] == ["saved"]
    r = api(url, "alice", "POST", "/v1/collections/notes/reindex")
    assert sorted(f["name"] for f in wait(url, "alice", "notes", r.json()["id"])["files"]) == [
        "papers/earth.pdf", "report.docx"]
    assert {d["source"] for d in api(url, "alice", "GET", "/v1/collections/notes/documents").json()["data"]} == {
        "papers/earth.pdf", "report.docx"}
    jobs = api(url, "alice", "GET", "/v1/collections/notes/jobs").json()["data"]
    assert len(jobs) == 3 and jobs[0]["kind"] == "reindex"


def test_bad_files_get_one_line_reasons_and_the_rest_is_indexed(server, src, tmp_path):
    url, _ = server
    assert upload(url, "alice", "bad", [("cats.md", src / "cats.md")]).status_code == 202
    time.sleep(0.5)
    before = api(url, "alice", "GET", "/v1/collections/bad/documents").json()["data"]
    cases = bad_inputs(tmp_path / "bad", max_upload_bytes=LIMIT)
    cases = [c for c in cases if c[0] != "too-big"]  # over the limit is a 413 for the request (below)
    r = upload(url, "alice", "bad", [(name, path) for _c, name, path, _e in cases] + [("good.md", src / "cats.md")])
    assert r.status_code == 202, r.text
    job = wait(url, "alice", "bad", r.json()["id"])
    for (case, _name, _path, expect), f in zip(cases, job["files"]):
        assert f["stage"] == "failed", case
        assert expect.lower() in f["reason"].lower() and "\n" not in f["reason"], (case, f["reason"])
        assert f["hint"], case
    assert job["files"][-1]["stage"] == "saved" and job["files"][-1]["name"] == "good.md"
    after = api(url, "alice", "GET", "/v1/collections/bad/documents").json()["data"]
    assert [d for d in after if d["source"] != "good.md"] == before
    failures = api(url, "alice", "GET", "/v1/collections/bad/failures").json()["data"]
    assert {f["name"] for f in failures} >= {"bomb.docx", "macros.docm", "../../etc/passwd", "locked.pdf"}


def test_a_file_over_the_limit_is_413_and_nothing_changes(server, src):
    url, runtime = server
    upload(url, "alice", "limits", [("cats.md", src / "cats.md")])
    time.sleep(0.5)
    before = api(url, "alice", "GET", "/v1/collections/limits/documents").json()["data"]
    r = upload(url, "alice", "limits", [("ok.md", src / "cats.md"), ("huge.txt", b"a" * (LIMIT + 10))])
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "huge.txt" in message and f"{LIMIT:,}" in message and "\n" not in message
    assert api(url, "alice", "GET", "/v1/collections/limits/documents").json()["data"] == before
    assert not list((runtime.documents.home / "tmp" / "uploads").glob("*/*"))  # temp files are gone


def test_a_2_gb_upload_is_cut_off_at_the_limit(server):
    """The client announces 2 GB; the server reads a little over the limit, answers 413 and hangs up."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    boundary = "x" * 20
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.pdf\"\r\n"
            f"Content-Type: application/pdf\r\n\r\n").encode()
    total = 2 * 1024 ** 3
    request = (f"POST /v1/collections/limits2/files HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {KEYS['alice']}\r\nContent-Length: {total}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode() + head
    sent = 0
    started = time.time()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        block = b"\0" * 65536
        try:
            while sent < 3 * LIMIT:  # far less than 2 GB: the server must answer long before
                sock.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 200:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except (ConnectionResetError, socket.timeout):
            pass
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    body = json.loads(data.split(b"\r\n\r\n", 1)[1].split(b"\r\n0\r\n")[0] or b"{}")
    assert "big.pdf" in body["error"]["message"] and "over the upload limit" in body["error"]["message"]
    assert time.time() - started < 30
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_names_with_slashes_and_bad_requests(server, src):
    url, _ = server
    for name in ("a/b", "../etc", "..", "x" * 70, ".hidden"):
        r = api(url, "alice", "POST", "/v1/collections", json={"name": name})
        assert r.status_code == 400 and "is not valid" in r.json()["error"]["message"], (name, r.text)
    r = upload(url, "alice", "a%2Fb", [("cats.md", src / "cats.md")])
    assert r.status_code == 400 and "not valid" in r.json()["error"]["message"]
    r = api(url, "alice", "DELETE", "/v1/collections/x%2Fdocuments/d0123456789abcde")
    assert r.status_code == 400
    r = httpx.post(f"{url}/v1/collections/notes2/files", content=b"not multipart", headers={
        **h("alice"), "Content-Type": "text/plain"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/collections/notes2/files", files=[("other", ("a.md", b"x"))], headers=h("alice"))
    assert r.status_code == 400 and "files" in r.json()["error"]["message"]
    r = api(url, "alice", "POST", "/v1/collections/search", content=b'{"query": "x"}',
            headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = api(url, "alice", "POST", "/v1/collections/search", json={"query": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    assert api(url, "alice", "GET", "/v1/collections/nothing-here").status_code == 404
    assert httpx.get(url + "/v1/collections", timeout=10).status_code == 401


def test_cross_site_writes_are_refused(server, src):
    url, _ = server
    r = httpx.post(f"{url}/v1/collections/csrf/files", files=[("files", ("a.md", b"# injected"))],
                   headers={**h("alice"), "Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"]
    assert api(url, "alice", "GET", "/v1/collections/csrf").status_code == 404
    same = url.removeprefix("http://")
    r = httpx.post(f"{url}/v1/collections/csrf/files", files=[("files", ("a.md", b"# fine"))],
                   headers={**h("alice"), "Origin": f"http://{same}"})
    assert r.status_code == 202


def test_two_owners_cannot_see_search_or_delete_each_others(server, src):
    url, _ = server
    job = upload(url, "alice", "diary", [("cats.md", src / "cats.md")]).json()
    wait(url, "alice", "diary", job["id"])
    doc_id = api(url, "alice", "GET", "/v1/collections/diary/documents").json()["data"][0]["doc_id"]
    assert "diary" not in [c["name"] for c in api(url, "bob", "GET", "/v1/collections").json()["data"]]
    for method, path, body in [
            ("GET", "/v1/collections/diary", None), ("GET", "/v1/collections/diary/documents", None),
            ("DELETE", "/v1/collections/diary", None), ("DELETE", f"/v1/collections/diary/documents/{doc_id}", None),
            ("POST", "/v1/collections/diary/search", {"query": "cats"}),
            ("POST", "/v1/collections/search", {"query": "cats", "collections": ["diary"]}),
            ("GET", f"/v1/collections/diary/jobs/{job['id']}", None), ("GET", "/v1/collections/diary/jobs", None),
            ("POST", f"/v1/collections/diary/jobs/{job['id']}/retry", None),
            ("POST", "/v1/collections/diary/reindex", None), ("GET", "/v1/collections/diary/failures", None)]:
        r = api(url, "bob", method, path, json=body) if body else api(url, "bob", method, path)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert "cats" not in r.text.lower().replace("collections", "")
    # Searching "everything I can see" never reaches another owner's passages.
    r = api(url, "bob", "POST", "/v1/collections/search", json={"query": "cats sleep sixteen hours"})
    assert all(p["collection"] != "diary" for p in r.json()["data"])
    assert api(url, "alice", "GET", "/v1/collections/diary").status_code == 200


def test_shared_collections_admin_writes_everyone_reads(server, src):
    url, _ = server
    assert api(url, "alice", "POST", "/v1/collections", json={"name": "handbook", "shared": True}).status_code == 403
    assert api(url, "root", "POST", "/v1/collections", json={"name": "handbook", "shared": True}).status_code == 201
    job = upload(url, "root", "handbook", [("earth.pdf", src / "earth.pdf")]).json()
    assert job["shared"]
    wait(url, "root", "handbook", job["id"])
    mine = {c["name"]: c for c in api(url, "bob", "GET", "/v1/collections").json()["data"]}
    assert mine["handbook"]["shared"] and not mine["handbook"]["writable"]
    hits = api(url, "bob", "POST", "/v1/collections/handbook/search", json={"query": "volcanoes"}).json()["data"]
    assert hits[0]["source"] == "earth.pdf" and hits[0]["shared"]
    doc_id = api(url, "bob", "GET", "/v1/collections/handbook/documents").json()["data"][0]["doc_id"]
    assert api(url, "bob", "DELETE", f"/v1/collections/handbook/documents/{doc_id}").status_code == 403
    assert api(url, "bob", "DELETE", "/v1/collections/handbook").status_code == 403
    r = upload(url, "bob", "handbook", [("cats.md", src / "cats.md")], shared="true")
    assert r.status_code == 403
    # Without ?shared, a non-admin's upload goes into their own collection of that name.
    r = upload(url, "bob", "handbook", [("cats.md", src / "cats.md")])
    assert r.status_code == 202 and not r.json()["shared"]
    assert api(url, "root", "GET", "/v1/collections/handbook/documents").json()["data"][0]["source"] == "earth.pdf"


def test_the_chat_searches_the_callers_collections(server, src):
    url, _ = server
    job = upload(url, "alice", "pets", [("cats.md", src / "cats.md")]).json()
    wait(url, "alice", "pets", job["id"])

    def chat(user):
        r = api(url, user, "POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "How long do cats sleep?"}], "max_tokens": 4,
            "temperature": 0, "parley": {"collections": ["pets"], "always_search": True}})
        assert r.status_code == 200, r.text
        return r.json()["parley"]["sources"]

    sources = chat("alice")
    assert sources and sources[0]["source"] == "cats.md" and sources[0]["collection"] == "pets"
    assert chat("bob") == []  # bob has no collection "pets": nothing of alice's reaches his prompt


def test_openapi_documents_the_routes(server):
    url, _ = server
    spec = httpx.get(url + "/openapi.json", timeout=10).json()
    paths = spec["paths"]
    for path in ("/v1/collections", "/v1/collections/{name}/files", "/v1/collections/{name}/documents/{doc_id}",
                 "/v1/collections/{name}/jobs/{job_id}", "/v1/collections/search"):
        assert path in paths, path
    body = paths["/v1/collections/{name}/files"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
