"""Test helpers: a real Parley HTTP server on loopback, built over a given runtime."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, port: int | None = None):
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        raise RuntimeError("the test server did not start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def build_test_runtime(model_dir: Path | str, home: Path, **overrides):
    """A Runtime over a model folder (tiny or embedded), with tools when available."""
    from bot.config import Settings
    from bot.runtime import build_runtime

    settings = Settings(home=home, model=str(model_dir), **overrides)
    return build_runtime(settings, progress=False)


def shared_data() -> Path:
    """The project's shared data: $PARLEY_DATA, else ../shared/data beside the checkout (as CI lays
    it out), else /work/shared/data."""
    import os

    candidates = [os.environ.get("PARLEY_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                  "/work/shared/data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return Path("/work/shared/data")
