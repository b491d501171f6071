"""HTTP hardening from the reliability catalogue: file-route traversal, auth coverage, CORS, MCP, queue full."""

from __future__ import annotations

import threading

import httpx
import pytest

from bot.api import create_app
from tests.helpers import build_test_runtime, running_server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("sec-home"), auth="admin:pw",
                                 api_key="k", queue_size=2, max_batch_size=1)
    app = create_app(runtime)
    with running_server(app) as url:
        yield url, runtime, app
    runtime.engine.close()


@pytest.mark.parametrize("path", [
    "/gradio_api/file=../../etc/passwd", "/gradio_api/file=/etc/passwd",
    "/gradio_api/file=%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/gradio_api/file=%252e%252e%252fetc%252fpasswd",
    "/gradio_api/file=//host/share/x", "/gradio_api/file=.env", "/gradio_api/file=/ETC/passwd",
    "/gradio_api/file=http://169.254.169.254/latest/meta-data/",
    "/gradio_api/proxy=http://169.254.169.254/latest/meta-data/",
])
def test_file_routes_never_serve_outside_files(server, path):
    url, _, _ = server
    r = httpx.get(url + path, follow_redirects=False)
    assert r.status_code in (401, 403, 404), (path, r.status_code)
    assert "root:" not in r.text


def test_every_route_needs_login_or_key_except_an_allowlist(server):
    url, _, app = server
    allow = {"/health", "/login", "/gradio_api/login", "/logout", "/gradio_api/logout", "/docs", "/redoc",
             "/openapi.json", "/docs/oauth2-redirect", "/", "/config", "/gradio_api/config", "/favicon.ico",
             "/manifest.json", "/gradio_api/manifest.json", "/gradio_api/theme.css", "/theme.css",
             "/gradio_api/info", "/gradio_api/startup-events", "/gradio_api/heartbeat/{session_hash}",
             "/gradio_api/vibe-edit/", "/gradio_api/i18n/{lang}", "/gradio_api/pwa_icon", "/pwa_icon",
             "/gradio_api/pwa_icon/{size}", "/gradio_api/monitoring", "/gradio_api/monitoring/{key}",
             "/gradio_api/login_check", "/gradio_api/svelte/{path:path}", "/gradio_api/user", "/user",
             "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}", "/robots.txt",
             "/gradio_api/robots.txt", "/assets/{path:path}", "/static/{path:path}", "/gradio_api/static/{path:path}",
             "/gradio_api/assets/{path:path}", "/gradio_api/favicon.ico", "/svelte/{path:path}"}
    def walk(routes, prefix=""):
        for route in routes:
            sub = getattr(route, "app", None)
            if hasattr(route, "routes") and not hasattr(route, "methods"):  # a Mount: the Gradio app
                yield from walk(route.routes, prefix + route.path.rstrip("/"))
            elif sub is not None and hasattr(sub, "routes") and not hasattr(route, "methods"):
                yield from walk(sub.routes, prefix + route.path.rstrip("/"))
            else:
                yield prefix, route

    leaks, checked = [], 0
    for prefix, route in walk(app.routes):
        path = prefix + getattr(route, "path", "")
        if not path or path in allow or any(path.startswith(a.split("{")[0]) and "{" in a for a in allow if "{" in a):
            continue
        concrete = path.replace("{", "").replace("}", "").replace(":path", "")
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method in ("HEAD", "OPTIONS"):
                continue
            checked += 1
            r = httpx.request(method, url + concrete, json={}, timeout=10)
            if r.status_code < 400 or r.status_code >= 500:
                leaks.append((method, path, r.status_code))
    assert checked >= 10 and not leaks, (checked, leaks)


def test_ui_pages_require_login_and_accept_it(server):
    url, _, _ = server
    r = httpx.get(url + "/gradio_api/info")
    assert r.status_code in (401, 403) or "chat" not in r.text
    with httpx.Client() as client:
        r = client.post(url + "/login", data={"username": "admin", "password": "wrong"})
        assert r.status_code in (400, 401)
        r = client.post(url + "/login", data={"username": "admin", "password": "pw"})
        assert r.status_code == 200


def test_no_credentialed_cors_for_foreign_origins(server):
    url, _, _ = server
    for origin in ("https://evil.example", "null"):
        r = httpx.get(url + "/health", headers={"Origin": origin})
        assert r.headers.get("access-control-allow-origin") not in (origin, "*") or \
            r.headers.get("access-control-allow-credentials") != "true"


def test_no_mcp_server_unless_configured(server):
    url, _, _ = server
    assert httpx.get(url + "/gradio_api/mcp/sse").status_code in (401, 403, 404)


def test_queue_full_answers_promptly(server):
    url, runtime, _ = server
    gate = threading.Event()
    # Block the single batch slot so requests pile up in the engine queue (size 2).
    def hold(module, args):
        gate.wait(10)  # returns None: a pre-hook's return value would replace the inputs

    runtime.engine.model.register_forward_pre_hook(hold)
    statuses, retry_after = [], []

    def one():
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        statuses.append(r.status_code)
        if r.status_code == 503:
            retry_after.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads[:]:
        t.join(timeout=3)
    refused_fast = statuses.count(503)
    gate.set()
    for t in threads:
        t.join()
    assert refused_fast >= 1, statuses          # the extras were told "busy" within 3 s
    assert statuses.count(200) >= 2, statuses   # the accepted ones finished
    assert set(statuses) <= {200, 503} and all(retry_after), (statuses, retry_after)
