"""A local mock of Discord's REST API (aiohttp, 127.0.0.1 only) and builders of real discord.py objects.

Point discord.py at it with ``discord.http.Route.BASE`` (the ``discord_api`` helper does and
restores it), then ``await client.login("x")``: no gateway is involved. Messages sent, edited and
typed are recorded with their JSON payloads; ``fail_next`` makes the next matching call fail
(e.g. a 429 with ``retry_after``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOT_ID = 1000
APP_ID = 2000
MESSAGE_CONTENT = 1 << 18  # ApplicationFlags.gateway_message_content
BOT_USER = {"id": str(BOT_ID), "username": "parley", "discriminator": "0", "global_name": None, "avatar": None,
            "bot": True}


@dataclass
class Call:
    method: str
    path: str
    json: Any
    at: float
    result: dict = field(default_factory=dict)


class MockDiscordApi:
    def __init__(self, *, app_flags: int = MESSAGE_CONTENT):
        self.app_flags = app_flags
        self.calls: list[Call] = []
        self.failures: list[tuple[str, str, int, dict, dict]] = []
        self.messages: dict[str, dict] = {}
        self._ids = itertools.count(900_000)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    async def start(self) -> "MockDiscordApi":
        app = web.Application()
        app.router.add_route("*", "/api/v10/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def fail_next(self, method: str, path_part: str, status: int, body: dict, headers: dict | None = None) -> None:
        self.failures.append((method, path_part, status, body, headers or {}))

    def sent(self) -> list[Call]:
        return [c for c in self.calls if c.method == "POST" and c.path.endswith("/messages") and c.result]

    def edits(self) -> list[Call]:
        return [c for c in self.calls if c.method == "PATCH" and "/messages/" in c.path and c.result]

    def final_texts(self) -> list[str]:
        """The content each sent message ends with, in order of sending."""
        return [self.messages[c.result["id"]]["content"] for c in self.sent()]

    def message_payload(self, channel_id: str, content: str, *, author: dict = BOT_USER,
                        message_id: str | None = None) -> dict:
        return {"id": message_id or str(next(self._ids)), "channel_id": channel_id, "author": author,
                "content": content, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
                "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
                "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0}

    async def _handle(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body = await request.json() if request.can_read_body else None
        call = Call(request.method, path, body, time.monotonic())
        self.calls.append(call)
        for i, (method, part, status, fail_body, headers) in enumerate(self.failures):
            if method == request.method and part in path:
                del self.failures[i]
                return _json(fail_body, status=status, headers={"Via": "1.1 google", **headers})
        result = self._result(request.method, path, body)
        if result is None:
            return web.Response(status=204)
        call.result = result
        return _json(result)

    def _result(self, method: str, path: str, body: Any) -> Any:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return BOT_USER
        if path == "/oauth2/applications/@me":
            return {"id": str(APP_ID), "name": "parley", "icon": None, "description": "", "rpc_origins": [],
                    "bot_public": True, "bot_require_code_grant": False, "owner": BOT_USER, "summary": "",
                    "verify_key": "k", "team": None, "flags": self.app_flags}
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            return [{**cmd, "id": str(next(self._ids)), "application_id": str(APP_ID), "version": "1"}
                    for cmd in body]
        if parts[0] == "channels" and parts[-1] == "typing":
            return None
        if method == "POST" and parts[0] == "channels" and parts[-1] == "messages":
            message = self.message_payload(parts[1], body.get("content", ""))
            self.messages[message["id"]] = message
            return message
        if method == "PATCH" and parts[0] == "channels" and parts[2] == "messages":
            message = self.messages[parts[3]]
            message["content"] = body.get("content", message["content"])
            return message
        return {}


def _json(body: Any, *, status: int = 200, headers: dict | None = None) -> web.Response:
    # discord.py parses a body as JSON only when the content type is exactly application/json.
    return web.Response(body=json.dumps(body).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


@contextlib.asynccontextmanager
async def discord_api(**kwargs):
    """Start the mock, point discord.py at it, and always undo both."""
    import discord.http

    mock = await MockDiscordApi(**kwargs).start()
    old = discord.http.Route.BASE
    discord.http.Route.BASE = mock.base
    try:
        yield mock
    finally:
        discord.http.Route.BASE = old
        await mock.stop()


# -- real discord.py objects from payloads -----------------------------------------------------------
GUILD_ID, CHANNEL_ID, OWNER_ID = 3000, 3001, 4000


def add_guild(client, *, owner_id: int = OWNER_ID, thread_id: int | None = None):
    """Put a guild with one text channel (and optionally a thread in it) into the client's cache."""
    state = client._connection
    guild = state._add_guild_from_data({
        "id": str(GUILD_ID), "name": "Test", "owner_id": str(owner_id), "icon": None, "splash": None,
        "features": [], "emojis": [], "stickers": [], "member_count": 2, "mfa_level": 0,
        "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
        "roles": [{"id": str(GUILD_ID), "name": "@everyone", "permissions": "0", "position": 0, "color": 0,
                   "hoist": False, "managed": False, "mentionable": False}],
        "channels": [{"id": str(CHANNEL_ID), "type": 0, "name": "general", "position": 0,
                      "permission_overwrites": []}],
        "threads": ([{"id": str(thread_id), "type": 11, "name": "a thread", "parent_id": str(CHANNEL_ID),
                      "guild_id": str(GUILD_ID), "owner_id": str(owner_id), "message_count": 1,
                      "member_count": 1, "rate_limit_per_user": 0,
                      "thread_metadata": {"archived": False, "auto_archive_duration": 60, "locked": False,
                                          "archive_timestamp": dt.datetime.now(dt.timezone.utc).isoformat()}}]
                    if thread_id else []),
        "members": [], "voice_states": [], "presences": []})
    return guild


def user_payload(user_id: int, *, bot: bool = False) -> dict:
    return {"id": str(user_id), "username": f"user{user_id}", "discriminator": "0", "global_name": None,
            "avatar": None, "bot": bot}


def make_message(client, mock: MockDiscordApi, content: str, *, author_id: int = 5000, bot: bool = False,
                 guild: bool = True, mention_bot: bool = True, channel_id: int | None = None,
                 reference: str | None = None, message_id: str | None = None):
    """A real ``discord.Message`` as the gateway would deliver it."""
    import discord

    state = client._connection
    author = user_payload(author_id, bot=bot)
    if guild:
        g = state._get_guild(GUILD_ID) or add_guild(client)
        channel = g.get_channel_or_thread(channel_id or CHANNEL_ID)
    else:
        channel = discord.DMChannel(me=client.user, state=state,
                                    data={"id": str(channel_id or 7000), "type": 1, "recipients": [author]})
    data = mock.message_payload(str(channel.id), content, author=author, message_id=message_id)
    if guild:
        data["guild_id"] = str(GUILD_ID)
        data["member"] = {"roles": [], "joined_at": dt.datetime.now(dt.timezone.utc).isoformat(), "deaf": False,
                          "mute": False, "flags": 0}
    if mention_bot:
        data["mentions"] = [BOT_USER]
    if reference:
        data["type"] = 19
        data["message_reference"] = {"message_id": reference, "channel_id": str(channel.id)}
    return discord.Message(state=state, channel=channel, data=data)
