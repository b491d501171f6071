"""Who is using this browser tab: one ``Session`` shared by every tab builder.

Each tab's handlers take the browser's id (``session.browser_id``, a ``gr.BrowserState`` input)
and the ``gr.Request``, and ask ``session.identity(request, browser_id)`` who is asking. The
server decides, for every event: a logged-in user is ``user:NAME``; without login each browser
is ``browser:ID`` with a random ID.

Where the ID lives: an HttpOnly, SameSite=Strict cookie that `parley serve` sets on the first page
it sends (``install_browser_cookie``), so it exists before the page runs any event (no race with
a page-load handler), page scripts cannot read it, and other sites' pages cannot send it. Where
the app runs without that middleware (``demo.launch`` on a Space), the ID is kept in the
browser's local storage instead (``BrowserState``), made by the page-load event.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import gradio as gr

from bot.owners import Access, Identity, UnauthorizedError


def hf_username(request: gr.Request | None) -> str | None:
    """The Hugging Face user signed in through gr.LoginButton (OAuth on a Space), if any.

    Read from the session on the server, where Gradio's OAuth stored it; never from the browser.
    """
    raw = getattr(request, "request", None)
    try:
        info = raw.session.get("oauth_info") if raw is not None else None
    except (AssertionError, AttributeError):  # no SessionMiddleware: OAuth is not set up
        return None
    if not info or (info.get("expires_at") or float("inf")) < time.time():
        return None
    return (info.get("userinfo") or {}).get("preferred_username")


COOKIE = "parley_browser"


def new_browser_id() -> str:
    return secrets.token_urlsafe(18)


def browser_cookie(request: gr.Request | None) -> str | None:
    """The browser id from the HttpOnly cookie, when the request has a valid one."""
    raw = getattr(request, "request", None)
    value = getattr(raw, "cookies", {}).get(COOKIE) if raw is not None else None
    return value if isinstance(value, str) and _valid(value) else None


def _valid(browser_id: str) -> bool:
    return 16 <= len(browser_id) <= 64 and all(c.isalnum() or c in "-_" for c in browser_id)


def install_browser_cookie(app) -> None:
    """Give every browser that has none an id cookie (a pure ASGI middleware on the app)."""
    app.add_middleware(BrowserCookie)


class BrowserCookie:
    """Adds ``Set-Cookie: parley_browser=<random>`` to responses for browsers without a valid one.

    Pure ASGI rather than BaseHTTPMiddleware, which would hide client disconnects from endpoints.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith("/v1"):
            return await self.app(scope, receive, send)
        from http.cookies import SimpleCookie

        jar = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                try:
                    jar.load(value.decode("latin-1"))
                except Exception:  # a malformed Cookie header: treat as none
                    pass
        current = jar.get(COOKIE)
        if current is not None and _valid(current.value):
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = (f"{COOKIE}={new_browser_id()}; Max-Age={400 * 86400}; Path=/; HttpOnly; "
                          f"SameSite=Strict")
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


@dataclass
class Session:
    access: Access
    browser_id: gr.BrowserState
    """Holds this browser's random id (made on first visit by ``ensure_browser_id``)."""

    def identity(self, request: gr.Request | None, browser_id: str | None) -> Identity:
        """The identity of an event; gr.Error when it has none (the page shows the reason)."""
        username = getattr(request, "username", None) if request is not None else None
        browser_id = browser_cookie(request) or browser_id
        try:
            return self.access.web_identity(username, browser_id, hf_user=hf_username(request))
        except UnauthorizedError as exc:
            raise gr.Error(str(exc)) from None


    def identity_or_new(self, request: gr.Request | None, browser_id: str | None) -> tuple[Identity, str]:
        """For events that may be a visitor's very first (sending before the page-load event that
        makes the id has finished): make the id now; the event must return it to browser_id."""
        if not self.access.login_required and not browser_cookie(request):
            browser_id = ensure_browser_id(browser_id)
        return self.identity(request, browser_id), browser_id or ""


def make_session(access: Access) -> Session:
    """Create inside ``gr.Blocks``; call ``ensure_browser_id`` from ``demo.load`` first."""
    return Session(access=access, browser_id=gr.BrowserState(None, storage_key="parley-browser-id"))


def ensure_browser_id(browser_id: str | None) -> str:
    """The browser's id, made on its first visit (a demo.load handler; its output is browser_id)."""
    if isinstance(browser_id, str) and _valid(browser_id):
        return browser_id
    return new_browser_id()
