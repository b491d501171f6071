"""Model output cannot make the browser fetch anything from outside: every markdown and HTML way of
loading a URL, stored as replies and rendered by the real Gradio chat in headless Chromium.

Every request the page makes is recorded (``page.on("request")``) and none may go anywhere but the
app on 127.0.0.1; requests elsewhere are also aborted, so nothing really leaves the machine. The
rendered DOM is checked too, because a lazy or off-screen image might not be requested at once.
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlparse

import pytest

from bot.api import create_app
from tests.helpers import build_test_runtime, running_server
from tests.unit.test_tools_safety import EXFILTRATION_PAYLOADS

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
# The payloads (one reply each; every outside host is leakN.example, so a failure names its
# payload) are the unit tests' list: the same strings go through a CommonMark renderer there.
PAYLOADS = EXFILTRATION_PAYLOADS + [
    "```mermaid\nflowchart LR\n  A[harmless] --> B[diagram]\n```",  # a diagram that loads nothing still draws
]
SENTINEL = "end-of-payloads"


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("exfil-home"))
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        context = browser.new_context()
        requests: list[str] = []
        blocked: list[str] = []

        def only_local(route):
            if urlparse(route.request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", only_local)
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.set_default_timeout(30_000)
        yield page, requests, blocked
        browser.close()


def browser_owner(page, url, runtime) -> str:
    """Conversations are the browser's own: learn this browser's owner from a first message."""
    page.goto(url + "/")
    page.locator("#parley-input textarea").fill("who am I")
    page.locator("#parley-send").click()
    store, deadline = runtime.store, time.time() + 60
    while time.time() < deadline:
        for c in store.list_conversations(50, source="web"):
            if any(t.messages[0]["content"] == "who am I" for t in store.turns(c["id"])):
                return c["owner"]
        time.sleep(0.2)
    raise AssertionError("the first message was never stored")


OUTSIDE_ATTRS = """() => {
  const found = [];
  for (const el of document.querySelectorAll('*')) {
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      if (name === 'href' && el.tagName === 'A') continue;  // a link loads nothing until clicked
      if (/(^|:)(src|srcset|poster|background|data|href|action|formaction|content|ping)$/.test(name) ||
          name === 'style') {
        if (/leak\\d+\\.example/i.test(attr.value)) found.push(el.tagName + ' ' + name + '=' + attr.value);
      }
    }
    const bg = getComputedStyle(el).backgroundImage;
    if (bg && /leak\\d+\\.example/i.test(bg)) found.push(el.tagName + ' background-image ' + bg);
  }
  return found;
}"""


def test_no_model_output_makes_the_browser_fetch_from_outside(app_url, browser_page):
    url, runtime = app_url
    page, requests, blocked = browser_page
    owner = browser_owner(page, url, runtime)
    page.wait_for_timeout(500)
    baseline = [u for u in requests if urlparse(u).hostname != "127.0.0.1"]
    assert not baseline, f"the app itself loads from outside: {baseline}"

    store = runtime.store
    cid = store.create_conversation(title="exfiltration probe", source="web", owner=owner)
    for i, payload in enumerate(PAYLOADS):
        store.add_turn(cid, messages=[{"role": "user", "content": f"payload {i}"}], model="m", reply=payload)
    store.add_turn(cid, messages=[{"role": "user", "content": "last"}], model="m", reply=SENTINEL)
    requests.clear()
    page.reload()
    page.get_by_text("exfiltration probe").first.click()
    page.get_by_text(SENTINEL).first.wait_for()
    for message in page.locator(".message.bot").all():  # bring every reply on screen once
        message.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)

    outside = sorted({u for u in requests if urlparse(u).hostname != "127.0.0.1"})
    leaked = sorted({int(n) for u in outside for n in re.findall(r"leak(\d+)\.example", u)})
    assert not outside, f"requests left 127.0.0.1 for payloads {leaked}: {outside}"
    assert not blocked
    assert page.evaluate(OUTSIDE_ATTRS) == []
    assert urlparse(page.url).hostname == "127.0.0.1"  # no refresh navigated away
    # The harmless part of each reply is still shown.
    assert page.get_by_text("styled").count() >= 1 and page.get_by_text("quoted angle").count() >= 1
    assert page.locator(".message.bot svg").filter(has_text="harmless").count() >= 1  # diagrams still draw
