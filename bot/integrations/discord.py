"""Discord in front of the Assistant (``parley discord``; extra ``parley[discord]``, discord.py).

DISCORD_TOKEN is the bot token. Reading what people write needs the privileged Message Content
intent: it is requested here and checked at start-up against the application's flags, and a
gateway close 4014 is turned into the same clear "enable it in the Developer Portal" error.

What a mention or DM does: ignore bots (this one included) and anything already answered (dedupe
on the message id, so a gateway RESUME replay is not answered twice) -> the conversation is the
thread, or the reply chain (a reply to one of our answers continues that answer's conversation),
history from the store -> the channel's settings pick adapter, tools and system prompt -> the
reply is sent as a reply, edited about once a second while the typing indicator shows, and
continues in new messages past 2,000 characters without breaking code fences -> the turn is
stored with source="discord" and the reply's message id, so a 👍/👎 reaction becomes feedback.

Everything is sent with ``AllowedMentions.none()`` (model output never pings anyone, not even
@everyone) and with embeds suppressed (a reply cannot make Discord fetch a URL).
Application commands /ask, /translate, /sentiment and /search answer the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import threading
import time
from typing import Any, Callable

from bot.errors import ConfigError, ParleyError
from bot.integrations.common import (DISCORD_LIMIT, KeyedLocks, apply_settings_file, parse_config_command,
                                     record_reaction, resolve_settings, run_config_command, stream_reply,
                                     turn_options, user_error)

try:  # optional extra: the module stays importable so `parley discord` can say what to install
    import discord
    from discord import app_commands
except ImportError:  # pragma: no cover - exercised only without the extra
    discord = None  # type: ignore[assignment]
    app_commands = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_COMMANDS = {"ask": "ask", "translate": "translate", "sentiment": "sentiment", "search": "search"}
"""Application command name -> what it does (``ask``: the text as is; others: ``/verb TEXT``)."""
MESSAGE_CONTENT_HELP = (
    "the Message Content intent is not enabled for this bot: open https://discord.com/developers/applications, "
    "pick the application, go to Bot > Privileged Gateway Intents, turn on MESSAGE CONTENT INTENT, save, "
    "and start `parley discord` again")
SEND_TIMEOUT_S = 60.0


def require_discord() -> None:
    if discord is None:
        raise ConfigError("Discord support is not installed: pip install 'parley[discord]'")


def check_message_content(flags) -> None:
    """Raise a clear ConfigError unless the portal grants the Message Content intent."""
    if not (getattr(flags, "gateway_message_content", False) or getattr(flags, "gateway_message_content_limited", False)):
        raise ConfigError(MESSAGE_CONTENT_HELP)


class _LoopSink:
    """A MessageSink used from the worker thread that runs ``stream_reply``: each call runs the
    coroutine on the client's event loop and waits for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, post: Callable, edit: Callable):
        self.loop, self._post, self._edit = loop, post, edit
        self.messages: dict[str, Any] = {}

    def post(self, text: str) -> str:
        message = asyncio.run_coroutine_threadsafe(self._post(text, len(self.messages)), self.loop).result(SEND_TIMEOUT_S)
        self.messages[str(message.id)] = message
        return str(message.id)

    def edit(self, message_id: str, text: str) -> None:
        asyncio.run_coroutine_threadsafe(self._edit(self.messages[message_id], text), self.loop).result(SEND_TIMEOUT_S)


def _client_base():
    return discord.Client if discord is not None else object


class ParleyDiscord(_client_base()):  # type: ignore[misc]
    """A discord.Client that answers with the Assistant. All state lives in the store."""

    def __init__(self, assistant, store, *, interval: float = 1.0, params=None,
                 commands: dict[str, str] | None = None, sync_commands: bool = True,
                 on_first_post: Callable[[float], None] | None = None, **options: Any):
        require_discord()
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: must also be enabled in the Developer Portal
        super().__init__(intents=intents, allowed_mentions=discord.AllowedMentions.none(),
                         max_ratelimit_timeout=30.0, **options)
        self.assistant, self.store = assistant, store
        self.interval, self.params = interval, params
        self.commands = dict(commands or DEFAULT_COMMANDS)
        self.sync_commands = sync_commands
        self.on_first_post = on_first_post
        self.locks = KeyedLocks()
        # One cancel flag per running turn (the engine sets a turn's flag when its stream closes,
        # so a shared one would cancel every later turn); close() sets them all.
        self._running: set[threading.Event] = set()
        self.tree = app_commands.CommandTree(self)
        for name, verb in self.commands.items():
            self.tree.add_command(self._command(name, verb))

    # -- start-up --
    async def setup_hook(self) -> None:
        check_message_content(self.application_flags)
        if self.sync_commands:
            await self.tree.sync()

    async def close(self) -> None:
        for cancel in list(self._running):
            cancel.set()
        await super().close()

    # -- messages --
    async def on_message(self, message) -> None:
        await self.handle_message(message)

    def _addressed(self, message) -> bool:
        if message.author.bot or message.webhook_id or (self.user and message.author.id == self.user.id):
            return False
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return False
        return message.guild is None or (self.user is not None and self.user in message.mentions)

    async def handle_message(self, message) -> None:
        """Answer one message if it is a DM or mentions the bot (called by on_message and tests)."""
        if not self._addressed(message):
            return
        if not self.store.mark_seen(f"discord:msg:{message.id}"):
            log.info("discord: message %s already answered", message.id)
            return
        text = re.sub(rf"<@!?{self.user.id}>", "", message.content).strip()
        command = parse_config_command(text)
        if command is not None:
            await self._config(message, command)
            return
        if not text:
            await message.reply("Ask me something after the mention.", mention_author=False)
            return
        channel = message.channel
        conversation_id = self._conversation(message, text)

        async def post(content: str, index: int):
            if index == 0:
                return await message.reply(content, mention_author=False, suppress_embeds=True)
            return await channel.send(content, suppress_embeds=True)

        async def edit(sent, content: str):
            # suppress=True on every edit: discord.py's Message.edit sends flags=0 otherwise, which
            # turns link previews back on and Discord fetches every URL in the reply.
            await sent.edit(content=content, suppress=True)

        await self._answer(conversation_id, self._scopes(message.guild, channel), text, post, edit, channel)

    def _conversation(self, message, text: str) -> str:
        """A thread is one conversation; so is a reply chain through our answers."""
        if isinstance(message.channel, discord.Thread):
            return self.store.conversation_for(f"discord:thread:{message.channel.id}", source="discord",
                                               title=text[:80])
        ref = message.reference.message_id if message.reference else None
        if ref is not None:
            turn = self.store.turn_by_external_id(f"discord:{ref}")
            if turn is not None:
                return turn.conversation_id
        return self.store.conversation_for(f"discord:{message.channel.id}:{message.id}", source="discord",
                                           title=text[:80])

    @staticmethod
    def _scopes(guild, channel) -> list[str]:
        """Settings scopes, broadest first: server, channel (a thread also inherits its parent's)."""
        if guild is None:
            return [f"discord:dm:{channel.id}"]
        scopes = [f"discord:{guild.id}"]
        parent = getattr(channel, "parent_id", None)
        if parent:
            scopes.append(f"discord:{guild.id}:{parent}")
        scopes.append(f"discord:{guild.id}:{channel.id}")
        return scopes

    async def _answer(self, conversation_id: str, scopes: list[str], text: str, post, edit, channel) -> None:
        started = time.perf_counter()
        reported = []

        async def timed_post(content: str, index: int):
            sent = await post(content, index)
            if not reported and self.on_first_post is not None:
                reported.append(True)
                self.on_first_post(time.perf_counter() - started)
            return sent

        sink = _LoopSink(asyncio.get_running_loop(), timed_post, edit)

        def run_turn():
            cancel = threading.Event()
            self._running.add(cancel)
            try:
                with self.locks.get(conversation_id):
                    settings = resolve_settings(self.store, scopes)
                    options = turn_options(settings, source="discord", conversation_id=conversation_id,
                                           params=self.params)
                    conversation = self.store.history(conversation_id) + [{"role": "user", "content": text}]
                    events = self.assistant.respond(conversation, options, cancel=cancel)
                    return stream_reply(events, sink, limit=DISCORD_LIMIT, interval=self.interval)
            finally:
                self._running.discard(cancel)

        try:
            typing = channel.typing() if channel is not None else _nothing()
            async with typing:
                result = await asyncio.to_thread(run_turn)
        except discord.RateLimited as exc:
            log.warning("discord: rate limited for %.1f s", exc.retry_after)
            await self._say_quietly(post, sink, f"Discord is rate limiting me; please try again in "
                                                f"{int(exc.retry_after) + 1} seconds.")
            return
        except ParleyError as exc:
            log.info("discord: turn refused: %s", exc)
            await self._say_quietly(post, sink, user_error(str(exc)))
            return
        except Exception as exc:
            log.error("discord: turn failed (%s)", _short(exc))
            await self._say_quietly(post, sink, user_error("something went wrong; the details are in the server log"))
            return
        if result.done.turn_id and result.message_ids:
            self.store.set_turn_external_id(result.done.turn_id, f"discord:{result.message_ids[0]}")

    @staticmethod
    async def _say_quietly(post, sink: _LoopSink, text: str) -> None:
        try:
            await post(text, len(sink.messages))
        except Exception as exc:
            log.error("discord: could not send the error message either (%s)", _short(exc))

    # -- admin commands --
    async def _config(self, message, command) -> None:
        guild = message.guild
        if guild is None:
            if command.wide:
                await message.reply("Server settings can only be changed in the server.", mention_author=False)
                return
            scope = f"discord:dm:{message.channel.id}"
        else:
            perms = getattr(message.author, "guild_permissions", None)
            if not (perms and (perms.manage_guild or perms.administrator)):
                await message.reply("Only members with the Manage Server permission can change my settings.",
                                    mention_author=False)
                return
            scope = f"discord:{guild.id}" if command.wide else f"discord:{guild.id}:{message.channel.id}"
        reply = run_config_command(self.store, command, scope, check_adapter=self.assistant.engine.require_adapter)
        await message.reply(reply[:DISCORD_LIMIT], mention_author=False)

    # -- reactions --
    async def on_raw_reaction_add(self, payload) -> None:
        if self.user is not None and payload.user_id == self.user.id:
            return
        try:
            record_reaction(self.store, f"discord:{payload.message_id}", str(payload.emoji.name or ""),
                            source="discord", user=str(payload.user_id))
        except ParleyError as exc:
            log.warning("discord: could not record the reaction on %s: %s", payload.message_id, exc)

    # -- application commands --
    def _command(self, name: str, verb: str):
        client = self

        @app_commands.describe(text="what to ask" if verb == "ask" else f"the text to {verb}")
        async def callback(interaction: discord.Interaction, text: str) -> None:
            await client.answer_interaction(interaction, text, verb)

        description = {"ask": "Ask Parley", "translate": "Translate text", "sentiment": "Tell the sentiment of text",
                       "search": "Search the documents"}[verb]
        return app_commands.Command(name=name, description=description, callback=callback)

    async def answer_interaction(self, interaction, text: str, verb: str) -> None:
        if not self.store.mark_seen(f"discord:interaction:{interaction.id}"):
            return
        await interaction.response.defer(thinking=True)  # the 3-second acknowledgement
        question = text if verb == "ask" else f"/{verb} {text}"
        conversation_id = self.store.conversation_for(f"discord:{interaction.channel_id}:command:{interaction.id}",
                                                      source="discord", title=question[:80])
        none = discord.AllowedMentions.none()

        async def post(content: str, index: int):
            if index == 0:
                return await interaction.edit_original_response(content=content, allowed_mentions=none)
            return await interaction.followup.send(content, allowed_mentions=none, wait=True, suppress_embeds=True)

        async def edit(sent, content: str):
            await sent.edit(content=content, allowed_mentions=none)

        await self._answer(conversation_id, self._scopes(interaction.guild, interaction.channel), question, post,
                           edit, None)


class _nothing:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return f"{type(exc).__name__} {status}" if status else type(exc).__name__


# -- CLI -----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Add the `discord` verb to the main CLI."""
    p = subparsers.add_parser("discord", help="answer in Discord (mentions, DMs, /ask ...)",
                              description="Answer Discord mentions, DMs and application commands. The bot token "
                                          "comes from DISCORD_TOKEN. See docs/integrations.md.")
    p.add_argument("--channels", dest="channels_config", default=None, metavar="FILE",
                   help="TOML file of per-server/per-channel settings ([discord.\"GUILD/CHANNEL\"] adapter=...)")
    p.add_argument("--no-sync-commands", action="store_true",
                   help="do not (re)register the application commands at start-up")
    p.add_argument("--edit-interval", type=float, default=1.0, help="seconds between edits of a growing reply")
    p.set_defaults(func=run_discord)


def run_discord(args: argparse.Namespace) -> int:
    require_discord()
    token = os.environ.get("DISCORD_TOKEN", "").strip()
    if not token:
        raise ConfigError("DISCORD_TOKEN is not set: copy the token from https://discord.com/developers/applications "
                          "> your application > Bot > Reset Token (see docs/integrations.md)")
    assistant = args.build_assistant()
    if assistant.store is None:
        from bot.store import Store
        assistant.store = Store(args.settings.db_path)
    store = assistant.store
    if args.channels_config:
        log.info("discord: %d channel settings from %s",
                 apply_settings_file(store, args.channels_config, "discord"), args.channels_config)
    from bot.engine import GenerationParams

    client = ParleyDiscord(assistant, store, interval=args.edit_interval, sync_commands=not args.no_sync_commands,
                           params=GenerationParams(max_new_tokens=args.settings.max_new_tokens))
    try:
        client.run(token, log_handler=None)
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(MESSAGE_CONTENT_HELP) from None
    except discord.LoginFailure:
        raise ConfigError("Discord rejected DISCORD_TOKEN: reset the token under Bot in the Developer Portal and "
                          "set DISCORD_TOKEN to the new one") from None
    return 0


__all__ = ["add_parser", "run_discord", "ParleyDiscord", "check_message_content", "DEFAULT_COMMANDS"]
