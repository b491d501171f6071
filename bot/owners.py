"""Who is asking: identities, owners and the admin role, for every front end.

Data belongs to someone (conversations, document collections, feedback, votes). An ``Identity``
names that someone with an ``owner`` string, and whether they may do admin actions (train,
load or unload adapters, delete other people's data):

* ``user:NAME``: a person who logged in (``--auth NAME:PASSWORD``) or sent the API key of NAME
  (``--api-keys NAME:KEY``). The same NAME in the browser and over the API is the same person.
* ``browser:ID``: a browser without login; ID is random, kept in the browser (``gr.BrowserState``).
* ``hf:NAME``: a visitor of a Hugging Face Space who signed in with Hugging Face (OAuth).
* ``local``: the terminal and API clients of a server without keys.

Admins: the users listed in ``admins``, else the first ``--auth`` user and the owner of
``--api-key``. Without any auth, everyone is an admin only while the server listens on loopback
(a laptop); a public server without auth is refused at start unless ``--insecure-public``, and
even then admin actions are refused.

Every store, documents and training call takes the owner; the server checks it for every read
and write. Something that is not yours is "not found" (404), never data.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from bot.errors import ConfigError, ParleyError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOCAL = "local"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_BROWSER_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class ForbiddenError(ParleyError):
    """The identity may not do this (an admin action without the admin role)."""

    status = 403


class UnauthorizedError(ParleyError):
    """No valid credentials were sent."""

    status = 401


@dataclass(frozen=True)
class Identity:
    owner: str
    """The owner string stored with data (``user:alice``, ``browser:…``, ``local``)."""
    admin: bool = False
    """May train, load/unload adapters and manage shared data."""

    @property
    def label(self) -> str:
        """A short name to show to people."""
        kind, _, rest = self.owner.partition(":")
        return rest if kind == "user" else ("this browser" if kind == "browser" else self.owner)

    def require_admin(self, action: str) -> None:
        if not self.admin:
            raise ForbiddenError(f"{action} needs an admin: log in as one of the admins (the `admins` setting, "
                                 f"or the first --auth user), or send an admin's API key")


def owner_slug(owner: str) -> str:
    """A filesystem-safe, fixed-length folder name for an owner (never the raw string)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:24]


def _pairs(raw: str, what: str, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        name, sep, secret = item.partition(":")
        if not sep or not secret or not _NAME.match(name):
            raise ConfigError(f"{flag}: write each {what} as NAME:{what.upper()} (NAME of letters, digits, ._@-), "
                              f"separated by commas; got {name[:20]!r}")
        pairs.append((name, secret))
    return pairs


class Access:
    """The server's access rules, built once from Settings (api_key, api_keys, auth, admins, host)."""

    def __init__(self, *, host: str = "127.0.0.1", api_key: str = "", api_keys: str = "", auth: str = "",
                 admins: str = "", insecure_public: bool = False, oauth: bool = False):
        self.users = dict(_pairs(auth, "password", "--auth"))
        keys = _pairs(api_keys, "key", "--api-keys")
        first_user = next(iter(self.users), None)
        if api_key:
            keys.insert(0, (first_user or "admin", api_key))
        self.keys = [(name, secret.encode()) for name, secret in keys]
        named_admins = [a.strip() for a in admins.split(",") if a.strip()]
        self.admins = set(named_admins) or {n for n in (first_user, keys[0][0] if keys else None) if n}
        self.loopback = host in LOOPBACK
        self.insecure_public = insecure_public
        self.oauth = oauth
        """Hugging Face OAuth (a Space with ``hf_oauth: true``): signed-in visitors are ``hf:NAME``."""

    @classmethod
    def from_settings(cls, settings) -> "Access":
        return cls(host=settings.host, api_key=settings.api_key, api_keys=settings.api_keys, auth=settings.auth,
                   admins=settings.admins, insecure_public=settings.insecure_public)

    @property
    def keys_required(self) -> bool:
        return bool(self.keys)

    @property
    def login_required(self) -> bool:
        """The browser UI asks for a login whenever the API needs a key: one key or login covers
        every route that acts (an API key's owner logs in with their NAME and the key)."""
        return bool(self.users or self.keys)

    def check_startup(self) -> None:
        """Refuse a public server that anyone could use, unless explicitly asked for."""
        if not self.loopback and not (self.keys or self.users) and not self.insecure_public:
            raise ConfigError("refusing to serve on a public address without --api-key or --auth: anyone who can "
                              "reach it could use the model, read and delete data and start training. Add "
                              "--auth USER:PASSWORD (and --api-key KEY for the API), bind to 127.0.0.1, or pass "
                              "--insecure-public if that is really what you want")

    # -- the API ---------------------------------------------------------------------------------
    def api_identity(self, authorization: str | None) -> Identity:
        """The identity of an API request from its Authorization header; raises UnauthorizedError."""
        if not self.keys:
            return Identity(LOCAL, admin=self.loopback)
        given = (authorization or "").removeprefix("Bearer ").strip().encode()
        match = None
        for name, secret in self.keys:  # compare with every key: timing does not tell which matched
            if hmac.compare_digest(given, secret):
                match = name
        if match is None:
            raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        return Identity(f"user:{match}", admin=match in self.admins)

    # -- the browser -----------------------------------------------------------------------------
    def _names(self) -> set[str]:
        return set(self.users) | {name for name, _ in self.keys}

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's auth callable: an --auth user with their password, or a key's owner with the key."""
        given = (password or "").encode()
        ok = False
        candidates = ([self.users[username].encode()] if username in self.users else []) + \
            [secret for name, secret in self.keys if name == username]
        for secret in candidates or [b"\0invalid"]:  # compare even for unknown users (timing)
            ok |= hmac.compare_digest(given, secret)
        return ok and bool(candidates)

    def web_identity(self, username: str | None, browser_id: str | None, *, hf_user: str | None = None) -> Identity:
        """The identity of a browser session: the logged-in user, else the Hugging Face user who
        signed in (OAuth on a Space), else the browser's own random id."""
        if self.login_required:
            if not username or username not in self._names():
                raise UnauthorizedError("log in first")
            return Identity(f"user:{username}", admin=username in self.admins)
        if self.oauth and hf_user and _NAME.match(hf_user):
            return Identity(f"hf:{hf_user}", admin=hf_user in self.admins)
        if not browser_id or not _BROWSER_ID.match(browser_id):
            raise UnauthorizedError("this browser has no id yet: reload the page")
        return Identity(f"browser:{browser_id}", admin=self.loopback)


LOCAL_ADMIN = Identity(LOCAL, admin=True)
"""The terminal (`parley chat`, `parley index`): the person at the keyboard owns the machine."""
