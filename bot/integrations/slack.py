"""Slack in front of the Assistant (``parley slack``; extra ``parley[slack]``, slack-bolt).

Socket Mode by default (SLACK_BOT_TOKEN + SLACK_APP_TOKEN, no public URL); ``--http`` serves the
Events API instead (SLACK_SIGNING_SECRET; bolt verifies the signature on the raw body with a
5-minute replay window and answers 401 otherwise). ``mount_slack`` adds the same endpoint to the
``parley serve`` FastAPI app.

What one mention or DM does: dedupe on the event id (Slack retries events it thinks were not
acknowledged) and on the message itself -> the thread is the conversation (history from the
store) -> the channel's settings pick adapter, tools and system prompt -> the reply is posted in
the thread as soon as the first text exists, then edited about once a second (chat.update) ->
the turn is stored with source="slack" and the reply's ts, so a 👍/👎 reaction becomes feedback.

Model output is escaped (``& < >``), so ``<!channel>``, ``<!here>``, ``<@U…>`` and disguised links
are shown as text, never pings; link unfurling is off so a reply cannot make Slack fetch a URL.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bot.errors import ConfigError, ParleyError
from bot.integrations.common import (SLACK_LIMIT, KeyedLocks, apply_settings_file, parse_config_command,
                                     record_reaction, resolve_settings, run_config_command, slack_escape,
                                     stream_reply, turn_options, user_error)

try:  # optional extra: the module stays importable so `parley slack` can say what to install
    from slack_bolt import App
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError
    from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler
except ImportError:  # pragma: no cover - exercised only without the extra
    App = WebClient = None  # type: ignore[assignment,misc]
    SlackApiError = Exception  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

DEFAULT_COMMANDS = {"/ask": "ask", "/translate": "translate", "/sentiment": "sentiment", "/search": "search"}
"""Slack slash command -> what it does. ``ask`` sends the text as is; the others as ``/verb TEXT``,
which the assistant's tools handle."""
REQUIRED_SCOPES = ("app_mentions:read", "chat:write", "im:history", "reactions:read", "commands", "users:read")
MAX_BODY_BYTES = 1_000_000


def require_slack() -> None:
    if App is None:
        raise ConfigError("Slack support is not installed: pip install 'parley[slack]'")


def make_client(bot_token: str, *, base_url: str | None = None, max_rate_limit_retries: int = 3) -> "WebClient":
    """A WebClient that waits out 429s (``Retry-After``) and retries dropped connections."""
    require_slack()
    kwargs = {"base_url": base_url} if base_url else {}
    return WebClient(token=bot_token, retry_handlers=[
        ConnectionErrorRetryHandler(max_retry_count=2),
        RateLimitErrorRetryHandler(max_retry_count=max_rate_limit_retries)], **kwargs)


# -- Slack text -> plain text ------------------------------------------------------------------------
_ENTITY = re.compile(r"<([^<>]+)>")


def slack_to_plain(text: str, bot_user_id: str | None = None) -> str:
    """Incoming Slack mrkdwn to what a person typed: mentions as @name, links as text (url)."""
    def entity(match: re.Match) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        if target.startswith("@"):
            if bot_user_id and target[1:] == bot_user_id:
                return ""
            return "@" + (label or target[1:])
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            name = target[1:].split("^")[0]
            return label or "@" + name
        return f"{label} ({target})" if label and label != target else target

    plain = _ENTITY.sub(entity, text)
    plain = plain.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return " ".join(plain.split(" ")).strip()


# -- where a reply goes --------------------------------------------------------------------------
class SlackSink:
    """Posts and edits the messages of one reply in one channel/thread."""

    def __init__(self, client: "WebClient", channel: str, thread_ts: str | None):
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts

    def post(self, text: str) -> str:
        kwargs = {"thread_ts": self.thread_ts} if self.thread_ts else {}
        resp = self.client.chat_postMessage(channel=self.channel, text=text, unfurl_links=False,
                                            unfurl_media=False, **kwargs)
        return str(resp["ts"])

    def edit(self, message_id: str, text: str) -> None:
        self.client.chat_update(channel=self.channel, ts=message_id, text=text)


class CommandSink(SlackSink):
    """A slash command's answer: posted in the channel; where the bot may not post (not a member,
    someone else's DM) it falls back to the command's response_url with the finished text."""

    def __init__(self, client: "WebClient", channel: str, respond: Callable[..., Any]):
        super().__init__(client, channel, None)
        self.respond = respond
        self.buffered: dict[str, str] | None = None

    def post(self, text: str) -> str:
        if self.buffered is None:
            try:
                return super().post(text)
            except SlackApiError as exc:
                if exc.response.get("error") not in ("not_in_channel", "channel_not_found"):
                    raise
                self.buffered = {}
        key = f"buffered:{len(self.buffered)}"
        self.buffered[key] = text
        return key

    def edit(self, message_id: str, text: str) -> None:
        if self.buffered is not None and message_id in self.buffered:
            self.buffered[message_id] = text
        else:
            super().edit(message_id, text)

    def finish(self) -> None:
        for text in (self.buffered or {}).values():
            self.respond(text=text, response_type="in_channel", replace_original=False)


# -- the bridge ----------------------------------------------------------------------------------
@dataclass
class SlackBridge:
    """Slack events -> Assistant turns. Owns no state besides locks; everything lives in the store."""

    assistant: Any
    store: Any
    interval: float = 1.0
    """Seconds between edits of a growing reply (Slack allows about one write per second)."""
    commands: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COMMANDS))
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    on_first_post: Callable[[float], None] | None = None
    params: Any = None
    """GenerationParams for every turn (None: the engine's defaults)."""

    def register(self, app: "App") -> None:
        app.event("app_mention")(self.on_mention)
        app.event("message")(self.on_message)
        app.event("reaction_added")(self.on_reaction)
        app.event("reaction_removed")(lambda: None)  # feedback is append-only; acknowledged, ignored
        for name in self.commands:
            app.command(name)(ack=self.ack_command, lazy=[self.answer_command])

    # -- events --
    def _fresh(self, body: dict, event: dict, context: dict) -> bool:
        """False for retries, duplicates and anything a bot (this one included) said."""
        if event.get("bot_id") or event.get("subtype") or event.get("user") in (None, context.get("bot_user_id")):
            return False
        event_id = body.get("event_id")
        if event_id and not self.store.mark_seen(f"slack:event:{event_id}"):
            log.info("slack: ignoring retried event %s", event_id)
            return False
        # app_mention and message.im can both arrive for one message: answer it once.
        return self.store.mark_seen(f"slack:msg:{event.get('channel')}:{event.get('ts')}")

    def on_mention(self, body: dict, event: dict, context: dict, client: "WebClient") -> None:
        if self._fresh(body, event, context):
            self.answer_message(body, event, context, client)

    def on_message(self, body: dict, event: dict, context: dict, client: "WebClient") -> None:
        if event.get("channel_type") == "im" and self._fresh(body, event, context):
            self.answer_message(body, event, context, client)

    def on_reaction(self, body: dict, event: dict) -> None:
        item = event.get("item") or {}
        if item.get("type") != "message":
            return
        event_id = body.get("event_id")
        if event_id and not self.store.mark_seen(f"slack:event:{event_id}"):
            return
        external_id = f"slack:{item.get('channel')}:{item.get('ts')}"
        try:
            record_reaction(self.store, external_id, str(event.get("reaction", "")), source="slack",
                            user=str(event.get("user", "")))
        except ParleyError as exc:
            log.warning("slack: could not record the reaction on %s: %s", external_id, exc)

    def answer_message(self, body: dict, event: dict, context: dict, client: "WebClient") -> None:
        team = body.get("team_id") or event.get("team") or "T"
        channel = event["channel"]
        thread_ts = event.get("thread_ts") or event["ts"]
        text = slack_to_plain(event.get("text", ""), context.get("bot_user_id"))
        sink = SlackSink(client, channel, thread_ts)
        command = parse_config_command(text)
        if command is not None:
            self._config(command, team, channel, event.get("user", ""), client, sink)
            return
        if not text:
            sink.post("Ask me something after the mention.")
            return
        self.turn(f"slack:{team}:{channel}:{thread_ts}", team, channel, text, sink)

    # -- slash commands --
    def ack_command(self, ack: Callable[..., Any]) -> None:
        ack()  # within Slack's 3 s; the answer follows from the lazy listener

    def answer_command(self, body: dict, client: "WebClient", respond: Callable[..., Any]) -> None:
        trigger = body.get("trigger_id")
        if trigger and not self.store.mark_seen(f"slack:command:{trigger}"):
            return
        name, text = body.get("command", ""), (body.get("text") or "").strip()
        if not text:
            respond(text=f"Usage: `{name} your text`", response_type="ephemeral")
            return
        verb = self.commands.get(name, "ask")
        question = text if verb == "ask" else f"/{verb} {text}"
        team, channel, user = body.get("team_id") or "T", body.get("channel_id", ""), body.get("user_id", "")
        sink = CommandSink(client, channel, respond)
        prefix = f"<@{user}> asked `{slack_escape(name)}`: {slack_escape(text[:300])}\n\n"
        self.turn(f"slack:{team}:{channel}:command:{trigger or time.time()}", team, channel, question, sink,
                  prefix=prefix)
        sink.finish()

    # -- one turn --
    def turn(self, key: str, team: str, channel: str, text: str, sink: SlackSink, *, prefix: str = "") -> None:
        started = time.perf_counter()
        with self.locks.get(key):
            try:
                cid = self.store.conversation_for(key, source="slack", title=text[:80])
                settings = resolve_settings(self.store, [f"slack:{team}", f"slack:{team}:{channel}"])
                options = turn_options(settings, source="slack", conversation_id=cid, params=self.params)
                conversation = self.store.history(cid) + [{"role": "user", "content": text}]
                events = self.assistant.respond(conversation, options)
                result = stream_reply(events, _Timed(sink, started, self.on_first_post), limit=SLACK_LIMIT,
                                      render=lambda t: prefix + slack_escape(t), interval=self.interval)
            except ParleyError as exc:  # bad input, unknown adapter...: the user can act on these
                log.info("slack: turn refused: %s", exc)
                _post_quietly(sink, user_error(str(exc)))
                return
            except Exception as exc:
                log.error("slack: turn failed (%s: %s)", type(exc).__name__, _api_error(exc))
                _post_quietly(sink, user_error("something went wrong; the details are in the server log"))
                return
            if result.done.turn_id and result.message_ids and not result.message_ids[0].startswith("buffered:"):
                self.store.set_turn_external_id(result.done.turn_id, f"slack:{channel}:{result.message_ids[0]}")

    # -- admin commands --
    def _config(self, command, team: str, channel: str, user: str, client: "WebClient", sink: SlackSink) -> None:
        own_dm = channel.startswith("D") and not command.wide
        if not own_dm:
            try:
                info = client.users_info(user=user)["user"]
            except SlackApiError as exc:
                log.warning("slack: users.info failed: %s", _api_error(exc))
                sink.post("I could not check your permissions (the app needs the users:read scope).")
                return
            if not (info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner")):
                sink.post("Only workspace admins can change my settings here.")
                return
        scope = f"slack:{team}" if command.wide else f"slack:{team}:{channel}"
        sink.post(slack_escape(run_config_command(self.store, command, scope,
                                                  check_adapter=self.assistant.engine.require_adapter)))


class _Timed:
    """A sink wrapper that reports when the first message went out (for the latency benchmark)."""

    def __init__(self, sink: SlackSink, started: float, report: Callable[[float], None] | None):
        self.sink, self.started, self.report, self.posted = sink, started, report, False

    def post(self, text: str) -> str:
        ts = self.sink.post(text)
        if not self.posted and self.report is not None:
            self.report(time.perf_counter() - self.started)
        self.posted = True
        return ts

    def edit(self, message_id: str, text: str) -> None:
        self.sink.edit(message_id, text)


def _post_quietly(sink: SlackSink, text: str) -> None:
    try:
        sink.post(text)
    except Exception as exc:
        log.error("slack: could not post the error message either (%s)", _api_error(exc))


def _api_error(exc: Exception) -> str:
    """A Slack API failure as its error code (no request, no headers, no token)."""
    if isinstance(exc, SlackApiError) and getattr(exc, "response", None) is not None:
        return f"{exc.response.status_code} {exc.response.get('error')}"
    return type(exc).__name__


# -- building the app ----------------------------------------------------------------------------
def check_token(client: "WebClient") -> dict:
    """auth.test the bot token; report a bad token or missing scopes with what to do."""
    try:
        resp = client.auth_test()
    except SlackApiError as exc:
        raise ConfigError(f"Slack rejected SLACK_BOT_TOKEN ({exc.response.get('error')}): copy the Bot User "
                          "OAuth Token (xoxb-...) from your app's OAuth & Permissions page") from None
    granted = resp.headers.get("x-oauth-scopes") or resp.headers.get("X-OAuth-Scopes")
    if isinstance(granted, list):
        granted = granted[0]
    if granted:
        missing = sorted(set(REQUIRED_SCOPES) - {s.strip() for s in granted.split(",")})
        if missing:
            raise ConfigError(f"the Slack bot token lacks the scopes {', '.join(missing)}: add them under OAuth & "
                              "Permissions > Bot Token Scopes (or use the manifest in docs/integrations.md), "
                              "then reinstall the app")
    return resp.data if hasattr(resp, "data") else dict(resp)


def build_slack_app(assistant, store, *, client: "WebClient", signing_secret: str = "",
                    process_before_response: bool = False, interval: float = 1.0,
                    commands: dict[str, str] | None = None, params=None,
                    on_first_post: Callable[[float], None] | None = None) -> "App":
    """The bolt App with Parley's listeners. Tests pass ``process_before_response=True``."""
    require_slack()
    check_token(client)
    app = App(client=client, signing_secret=signing_secret, process_before_response=process_before_response,
              request_verification_enabled=bool(signing_secret), ignoring_self_events_enabled=True,
              name="parley")
    SlackBridge(assistant, store, interval=interval, commands=dict(commands or DEFAULT_COMMANDS),
                on_first_post=on_first_post, params=params).register(app)
    return app


def _endpoint(app: "App"):
    """An async Starlette/FastAPI endpoint that hands the raw body to bolt off the event loop."""
    from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    async def slack_events(request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return Response(status_code=413)
        # The raw bytes (the signature is checked on exactly these), read in chunks and capped while
        # reading: a chunked body has no Content-Length, and request.body() would buffer any size
        # before the signature could be checked.
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return Response(status_code=413)
        body = bytes(body)
        bolt_resp = await run_in_threadpool(app.dispatch, to_bolt_request(request, body))
        return to_starlette_response(bolt_resp)

    return slack_events


def slack_http_app(assistant, store, settings=None, *, signing_secret: str | None = None,
                   bot_token: str | None = None, client: "WebClient | None" = None, **kwargs):
    """A Starlette app answering the Events API at POST /slack/events (serve it with uvicorn)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    app = build_slack_app(assistant, store, client=client or make_client(_need("SLACK_BOT_TOKEN", bot_token)),
                          signing_secret=_need("SLACK_SIGNING_SECRET", signing_secret), **kwargs)
    return Starlette(routes=[Route("/slack/events", _endpoint(app), methods=["POST"])])


def mount_slack(fastapi_app, assistant, store, *, signing_secret: str | None = None,
                bot_token: str | None = None, path: str = "/slack/events", **kwargs) -> "App":
    """Add the Slack Events API endpoint to ``parley serve``'s FastAPI app; returns the bolt App."""
    app = build_slack_app(assistant, store, client=kwargs.pop("client", None)
                          or make_client(_need("SLACK_BOT_TOKEN", bot_token)),
                          signing_secret=_need("SLACK_SIGNING_SECRET", signing_secret), **kwargs)
    fastapi_app.add_route(path, _endpoint(app), methods=["POST"], include_in_schema=False)
    return app


def _need(env_name: str, value: str | None) -> str:
    value = value or os.environ.get(env_name, "")
    if not value:
        where = {"SLACK_BOT_TOKEN": "OAuth & Permissions > Bot User OAuth Token (xoxb-...)",
                 "SLACK_APP_TOKEN": "Basic Information > App-Level Tokens, scope connections:write (xapp-...)",
                 "SLACK_SIGNING_SECRET": "Basic Information > App Credentials > Signing Secret"}[env_name]
        raise ConfigError(f"{env_name} is not set: copy it from your Slack app's {where} "
                          "(see docs/integrations.md)")
    return value


# -- CLI -----------------------------------------------------------------------------------------
def _command_map(specs: list[str] | None) -> dict[str, str]:
    commands = dict(DEFAULT_COMMANDS)
    for spec in specs or []:
        action, sep, name = spec.partition("=")
        if not sep or action not in DEFAULT_COMMANDS.values() or not re.fullmatch(r"/[\w-]{1,31}", name):
            raise ConfigError(f"--command {spec!r}: write ACTION=/name, ACTION one of "
                              f"{', '.join(DEFAULT_COMMANDS.values())}")
        commands = {k: v for k, v in commands.items() if v != action}
        commands[name] = action
    return commands


def add_parser(subparsers) -> None:
    """Add the `slack` verb to the main CLI."""
    p = subparsers.add_parser("slack", help="answer in Slack (Socket Mode; --http for the Events API)",
                              description="Answer Slack mentions, DMs and slash commands. Tokens come from "
                                          "SLACK_BOT_TOKEN, SLACK_APP_TOKEN (Socket Mode) and "
                                          "SLACK_SIGNING_SECRET (--http). See docs/integrations.md.")
    p.add_argument("--http", action="store_true", help="serve the Events API over HTTP instead of Socket Mode")
    p.add_argument("--host", default="127.0.0.1", help="interface for --http (default 127.0.0.1; put a "
                                                         "TLS proxy in front for Slack to reach it)")
    p.add_argument("--port", type=int, default=3000, help="port for --http (default 3000)")
    p.add_argument("--channels", dest="channels_config", default=None, metavar="FILE",
                   help="TOML file of per-workspace/per-channel settings ([slack.\"T123/C456\"] adapter=...)")
    p.add_argument("--command", action="append", metavar="ACTION=/name",
                   help="rename a slash command, e.g. ask=/parley-ask (repeatable)")
    p.add_argument("--edit-interval", type=float, default=1.0, help="seconds between edits of a growing reply")
    p.set_defaults(func=run_slack)


def run_slack(args: argparse.Namespace) -> int:
    require_slack()
    bot_token = _need("SLACK_BOT_TOKEN", None)
    signing_secret = _need("SLACK_SIGNING_SECRET", None) if args.http else ""
    app_token = "" if args.http else _need("SLACK_APP_TOKEN", None)
    if app_token and not app_token.startswith("xapp-"):
        raise ConfigError("SLACK_APP_TOKEN must be an app-level token (xapp-...), not a bot token: create one "
                          "under Basic Information > App-Level Tokens with the connections:write scope")
    commands = _command_map(args.command)
    client = make_client(bot_token)
    check_token(client)  # fail before loading the model
    assistant = args.build_assistant()
    if assistant.store is None:
        from bot.store import Store
        assistant.store = Store(args.settings.db_path)
    store = assistant.store
    if args.channels_config:
        log.info("slack: %d channel settings from %s", apply_settings_file(store, args.channels_config, "slack"),
                 args.channels_config)
    from bot.engine import GenerationParams

    kwargs = dict(interval=args.edit_interval, commands=commands,
                  params=GenerationParams(max_new_tokens=args.settings.max_new_tokens))
    if args.http:
        import uvicorn

        web = slack_http_app(assistant, store, signing_secret=signing_secret, client=client, **kwargs)
        uvicorn.run(web, host=args.host, port=args.port, log_level="warning")
        return 0
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    app = build_slack_app(assistant, store, client=client, **kwargs)
    log.info("slack: connecting in Socket Mode")
    SocketModeHandler(app, app_token).start()
    return 0


__all__ = ["add_parser", "run_slack", "build_slack_app", "slack_http_app", "mount_slack", "make_client",
           "slack_to_plain", "SlackBridge", "DEFAULT_COMMANDS"]
