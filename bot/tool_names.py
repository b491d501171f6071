"""The names of Parley's built-in tools: the one place every front end and the router take them from.

Outside the bot.tools package on purpose: the router, the integrations and the UI need the names
without importing the tools (and the tools import the router)."""

from __future__ import annotations

SEARCH, TRANSLATE, SENTIMENT = "search", "translate", "sentiment"
TOOL_NAMES: tuple[str, ...] = (SEARCH, TRANSLATE, SENTIMENT)
"""Built-in tools, in the order they are offered (registry, help text, UI switches, channel settings)."""
