"""Fixtures of the e2e tier's feature matrix, and the hook that reports it.

Fixtures (session-scoped, started only when a cell needs them): one throw-away PARLEY_HOME with
the converted embedded model, a real LoRA adapter and two indexed documents; one ``parley serve``
on it; a driver per front end (tests/e2e/feature_matrix_helpers.py).

Report: every test marked ``feature_matrix(feature=..., frontend=...)`` is recorded; at the end
of the run the feature x front end matrix (PASS / FAIL / XFAIL / — not offered / "not run") is
printed and written to bench/results/feature_matrix.json and .md.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest

from tests.e2e.feature_matrix_helpers import (CLI_RUNS, FEATURES, FRONTENDS, MAX_TOKENS, NOT_OFFERED,
                                              BrowserChat, DiscordDriver, Home, Repl, StoreReader, parley_serve,
                                              run_cli, slack_driver)

_RESULTS = pytest.StashKey[dict]()
_STARTED = pytest.StashKey[float]()


# -- the report -------------------------------------------------------------------------------------
def pytest_configure(config):
    config.addinivalue_line("markers", "feature_matrix(feature, frontend): one cell of the feature x front end "
                                       "matrix (tests/e2e/test_feature_matrix.py)")
    config.stash[_RESULTS] = {}


def pytest_sessionstart(session):
    session.config.stash[_STARTED] = time.time()


def _reason(report, call) -> str:
    if call is not None and call.excinfo is not None:
        text = call.excinfo.exconly()
    else:
        text = getattr(report, "longreprtext", "") or ""
    line = " ".join(text.strip().split())
    return line[:400]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("feature_matrix")
    if marker is None:
        return
    key = (marker.kwargs["feature"], marker.kwargs["frontend"])
    results = item.config.stash[_RESULTS]
    entry = results.setdefault(key, {"status": "not run", "nodeid": item.nodeid, "duration_s": 0.0, "reason": ""})
    entry["duration_s"] = round(entry["duration_s"] + report.duration, 2)
    if report.when == "setup":
        if report.failed:
            entry.update(status="FAIL", reason="setup: " + _reason(report, call))
        elif report.skipped:
            entry.update(status="SKIP", reason=_reason(report, call))
    elif report.when == "call":
        if hasattr(report, "wasxfail"):
            entry.update(status="XFAIL" if report.skipped else "FAIL", reason=report.wasxfail or _reason(report, call))
        elif report.passed:
            entry.update(status="PASS", reason="")
        elif report.failed:
            entry.update(status="FAIL", reason=_reason(report, call))
        else:
            entry.update(status="SKIP", reason=_reason(report, call))
    elif report.when == "teardown" and report.failed and entry["status"] == "PASS":
        entry.update(status="FAIL", reason="teardown: " + _reason(report, call))


def _matrix(results: dict) -> dict:
    cells = {}
    for feature in FEATURES:
        cells[feature] = {}
        for frontend in FRONTENDS:
            if (feature, frontend) in NOT_OFFERED:
                cells[feature][frontend] = {"status": "—", "reason": NOT_OFFERED[(feature, frontend)]}
            else:
                cells[feature][frontend] = results.get((feature, frontend), {"status": "not run"})
    return cells


def _markdown(cells: dict, summary: str) -> str:
    lines = ["# Feature matrix", "", summary, "",
             "| feature | " + " | ".join(FRONTENDS) + " |", "|---" * (len(FRONTENDS) + 1) + "|"]
    for feature in FEATURES:
        lines.append(f"| {feature} | " + " | ".join(cells[feature][f]["status"] for f in FRONTENDS) + " |")
    problems = [(f"{feature}[{frontend}]", c) for feature in FEATURES for frontend, c in cells[feature].items()
                if c["status"] in ("FAIL", "XFAIL", "SKIP")]
    if problems:
        lines += ["", "## Not passing", ""]
        lines += [f"- `{name}` {c['status']}: {c.get('reason', '')}" for name, c in problems]
    lines += ["", "## Not offered (—)", ""]
    lines += [f"- `{feature}[{frontend}]`: {why}" for (feature, frontend), why in NOT_OFFERED.items()]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    cells = _matrix(results)
    ran = [c for c in results.values() if c["status"] != "not run"]
    counts = {s: sum(1 for c in ran if c["status"] == s) for s in ("PASS", "FAIL", "XFAIL", "SKIP")}
    wall = time.time() - config.stash.get(_STARTED, time.time())
    summary = (f"{len(ran)} cells run: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
               + f"; {sum(c['duration_s'] for c in ran):.0f} s in cells, {wall:.0f} s wall for the session")
    width = max(len(f) for f in FEATURES)
    tr = terminalreporter
    tr.write_sep("=", "feature matrix")
    tr.write_line(" " * (width + 2) + "  ".join(f"{f:>10}" for f in FRONTENDS))
    for feature in FEATURES:
        tr.write_line(f"{feature:<{width}}  " + "  ".join(f"{cells[feature][f]['status']:>10}" for f in FRONTENDS))
    tr.write_line(summary)
    for feature in FEATURES:
        for frontend in FRONTENDS:
            c = cells[feature][frontend]
            if c["status"] in ("FAIL", "XFAIL"):
                tr.write_line(f"  {c['status']} {feature}[{frontend}]: {c.get('reason', '')[:300]}")
    out = Path(config.rootpath) / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"features": list(FEATURES), "frontends": list(FRONTENDS), "cells": cells, "summary": summary,
               "counts": counts, "wall_s": round(wall, 1), "max_tokens": MAX_TOKENS,
               "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "feature_matrix.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "feature_matrix.md").write_text(_markdown(cells, summary), encoding="utf-8")
    tr.write_line(f"matrix written to {out / 'feature_matrix.json'} and .md")


# -- the server and the drivers -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def _matrix_home(tmp_path_factory, embedded_home):
    home = Home(tmp_path_factory.mktemp("feature-matrix") / "home", embedded_home)
    yield home
    home.close()


@pytest.fixture(scope="session")
def matrix_home(_matrix_home) -> Path:
    """The PARLEY_HOME, its documents indexed."""
    return _matrix_home.ready()


@pytest.fixture(scope="session")
def matrix_server(_matrix_home):
    with parley_serve(_matrix_home) as server:  # starts while the documents are being indexed
        yield server


class ApiDriver:
    def __init__(self, server):
        from openai import OpenAI

        self.server = server
        self.client = OpenAI(base_url=server.url + "/v1", api_key="matrix", max_retries=0, timeout=120)
        self.store = StoreReader(server.home / "parley.db")


@pytest.fixture(scope="session")
def matrix_api(matrix_server):
    return ApiDriver(matrix_server)


class GradioDriver:
    def __init__(self, server):
        from gradio_client import Client

        self.client = Client(server.url + "/", verbose=False)
        self.store = StoreReader(server.home / "parley.db")


@pytest.fixture(scope="session")
def matrix_gradio(matrix_server):
    driver = GradioDriver(matrix_server)
    yield driver
    driver.client.close()  # its heartbeat stream would hold the server's graceful shutdown


class TerminalDriver:
    """The one-shot `parley chat` runs (CLI_RUNS) and one interactive REPL shared by the cells
    that type into it. All of them start at once: each spends most of its time loading."""

    REPL_ARGS = ["--temperature", "0", "--max-new-tokens", str(MAX_TOKENS)]

    def __init__(self, home: Path):
        self.home = home
        self.store = StoreReader(home / "parley.db")
        self._pool = concurrent.futures.ThreadPoolExecutor(len(CLI_RUNS), thread_name_prefix="parley-chat")
        self._runs = {name: self._pool.submit(run_cli, home, args, stdin=stdin)
                      for name, (args, stdin) in CLI_RUNS.items()}
        self._starting: Repl | None = Repl(home, self.REPL_ARGS)
        self._repl: Repl | None = None

    def once(self, name: str):
        """The finished one-shot run ``name`` of CLI_RUNS."""
        return self._runs[name].result(timeout=300)

    def repl(self) -> Repl:
        if self._repl is None:
            repl, self._starting = self._starting or Repl(self.home, self.REPL_ARGS), None
            try:
                repl.read_until_prompt(timeout=180)
            except BaseException:
                repl.close()
                raise
            self._repl = repl
        return self._repl

    def close(self) -> None:
        for repl in (self._repl, self._starting):
            if repl is not None:
                repl.close()
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def matrix_terminal(matrix_home):
    driver = TerminalDriver(matrix_home)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def _chromium():
    # Module scope, not session: Playwright's sync API keeps an event loop running in the main
    # thread while it is open, and every later test that calls asyncio.run() (Slack, Discord)
    # would fail with "cannot be called from a running event loop".
    from playwright.sync_api import sync_playwright

    from tests.e2e.feature_matrix_helpers import CHROMIUM, CHROMIUM_FLAGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def matrix_browser(_chromium, matrix_server, tmp_path):
    """A fresh browser context (a new person: no conversation, default settings) on the Chat tab."""
    context = _chromium.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield BrowserChat(page, matrix_server).open()
    finally:
        try:
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        except Exception:
            pass
        context.close()


@pytest.fixture(scope="session")
def matrix_runtime(matrix_home):
    """The real Assistant in-process on the same PARLEY_HOME, for Slack and Discord."""
    from bot.config import Settings
    from bot.runtime import build_runtime

    runtime = build_runtime(Settings(home=matrix_home, max_new_tokens=MAX_TOKENS), progress=False)
    yield runtime
    runtime.engine.close()


@pytest.fixture(scope="session")
def matrix_slack(matrix_runtime):
    pytest.importorskip("slack_bolt")
    with slack_driver(matrix_runtime) as driver:
        yield driver


@pytest.fixture(scope="session")
def matrix_discord(matrix_runtime):
    pytest.importorskip("discord")
    return DiscordDriver(matrix_runtime)
