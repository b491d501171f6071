"""Two browsers on one server without login: each sees only its own conversations.

Two Playwright browser contexts are two visitors (separate local storage, so separate random
browser ids). Neither lists the other's chat in the sidebar, and a conversation id copied from one
into the other's storage loads nothing.
"""

from __future__ import annotations

import time

import pytest

from bot.api import create_app
from tests.browser import launch, send
from tests.helpers import build_test_runtime, running_server



@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    runtime = build_test_runtime(tiny_model_dir, tmp_path_factory.mktemp("iso-home"), max_new_tokens=8)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


def conversation_of(store, text, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for c in store.list_conversations(100):
            if any(t.messages and t.messages[0]["content"] == text for t in store.turns(c["id"])):
                return c
        time.sleep(0.2)
    raise AssertionError(f"no stored conversation starts with {text!r}")


def test_two_browsers_never_see_each_others_chats(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    url, runtime = app_url
    with sync_playwright() as p:
        browser = launch(p)
        alice, bob = browser.new_context().new_page(), browser.new_context().new_page()
        for page in (alice, bob):
            page.set_default_timeout(30_000)
            page.goto(url + "/")
        send(alice, "alice private note")
        send(bob, "bob private note")
        a, b = conversation_of(runtime.store, "alice private note"), conversation_of(runtime.store, "bob private note")
        assert a["owner"].startswith("browser:") and b["owner"].startswith("browser:") and a["owner"] != b["owner"]

        for page in (alice, bob):
            page.reload()
            page.locator("#parley-chatbot").wait_for()
        alice.get_by_text("alice private note").first.wait_for()
        bob.get_by_text("bob private note").first.wait_for()
        time.sleep(1.0)  # let the sidebar fill
        assert alice.get_by_text("bob private note").count() == 0
        assert bob.get_by_text("alice private note").count() == 0
        alice.screenshot(path=str(tmp_path / "alice.png"))

        # Bob plants Alice's conversation id in his browser's storage: nothing of hers loads, and
        # his next message starts a conversation of his own instead of extending hers.
        keys = bob.evaluate("Object.keys(window.localStorage)")
        conversation_key = next(k for k in keys if "parley-conversation" in k)
        stored = alice.evaluate(f"window.localStorage.getItem({conversation_key!r})")
        bob.evaluate(f"window.localStorage.setItem({conversation_key!r}, {stored!r})")
        bob.reload()
        bob.locator("#parley-chatbot").wait_for()
        time.sleep(1.5)
        assert bob.get_by_text("alice private note").count() == 0
        send(bob, "bob again")
        mine = conversation_of(runtime.store, "bob again")
        assert mine["owner"] == b["owner"] and mine["id"] != a["id"]
        assert len(runtime.store.turns(a["id"])) == 1
        browser.close()
