"""Headless Debian Chromium for browser tests: the binary, the flags this machine needs, helpers.

Playwright's own browser download does not work offline; Debian's chromium does. Without the
background-networking flags Chromium keeps trying to reach Google's hosts.
"""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


def launch(playwright):
    """A headless Chromium browser from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)


def send(page, text: str) -> None:
    """Type a message into the chat and press Send, as a person does."""
    page.locator("#parley-input textarea").fill(text)
    page.locator("#parley-send").click()
