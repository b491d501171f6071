"""A local mock of the Slack Web API (bolt-python's own test pattern), on 127.0.0.1 only.

Point ``WebClient(base_url=server.url)`` at it. It records every call (method, arguments, time),
answers ``auth.test``, ``chat.postMessage`` (with increasing ``ts``), ``chat.update`` and
``users.info``, and can be told to fail the next call of a method (a 429 with Retry-After, or a
Slack error such as ``not_in_channel``).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

SCOPES = "app_mentions:read,chat:write,im:history,reactions:read,commands,users:read"
BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
TEAM_ID = "T1"


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class MockSlackApi:
    def __init__(self, scopes: str = SCOPES):
        self.scopes = scopes
        self.calls: list[Call] = []
        self.failures: dict[str, list[Failure]] = {}
        self.admins: set[str] = set()
        self._ts = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def start(self) -> "MockSlackApi":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail_next(self, method: str, status: int = 200, error: str = "ratelimited",
                  headers: dict[str, str] | None = None) -> None:
        self.failures.setdefault(method, []).append(Failure(status, {"ok": False, "error": error}, headers or {}))

    def of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def wait_for(self, method: str, count: int = 1, timeout: float = 10.0) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.of(method)) >= count:
                return self.of(method)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} {method} calls, got {len(self.of(method))}")

    def _answer(self, method: str, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            call = Call(method, args, time.monotonic())
            self.calls.append(call)
            status, body, headers = self._result(method, args)
            call.result = body
            return status, body, headers

    def _result(self, method: str, args: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        if True:
            pending = self.failures.get(method)
            if pending:
                failure = pending.pop(0)
                return failure.status, failure.body, failure.headers
            if method == "auth.test":
                return 200, {"ok": True, "url": "https://example.slack.com/", "team": "Test", "user": "parley",
                             "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": BOT_ID}, \
                    {"x-oauth-scopes": self.scopes}
            if method == "chat.postMessage":
                self._ts += 1
                return 200, {"ok": True, "channel": args.get("channel"), "ts": f"1700000000.{self._ts:06d}",
                             "message": {"text": args.get("text")}}, {}
            if method == "chat.update":
                return 200, {"ok": True, "channel": args.get("channel"), "ts": args.get("ts")}, {}
            if method == "users.info":
                user = args.get("user")
                return 200, {"ok": True, "user": {"id": user, "is_admin": user in self.admins}}, {}
            return 200, {"ok": True}, {}

    def _handler(self):
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8") if length else ""
                if raw.startswith("{"):
                    args = json.loads(raw)
                else:
                    args = {k: v[0] for k, v in parse_qs(raw or parsed.query).items()}
                status, body, headers = mock._answer(parsed.path.strip("/"), args)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        return Handler
