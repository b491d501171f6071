"""Tools the chat can use: document search, translation, sentiment.

Public API (what front ends call):

    from bot.tools import build_tool_runner, sanitize_markdown, format_sources, conversation_mood

    runner = build_tool_runner(engine, home)          # -> ToolRunner; pass to Assistant(tools=runner)
    threading.Thread(target=runner.warm, daemon=True).start()   # load MiniLM for routing early
    sanitize_markdown(reply)                           # before rendering model output (UI, API, Slack, Discord)
    format_sources(done.sources)                       # "[1] title (path, p. 3): "snippet"" lines for text UIs
    conversation_mood(messages)                        # sentiment of each user message, for a mood chart

Modules: registry (typed functions -> JSON schemas, validation, timeouts), builtin (the three
tools), search / translate / sentiment (their backends), native (tool-call parsing), safety
(untrusted text), runner (one turn's tool work), and bot/router.py (slash commands, intent routing).
"""

from bot.tools.registry import Tool, ToolError, ToolRegistry, ToolResult, ToolValidationError
from bot.tools.runner import ToolOutcome, ToolRunner, ToolSettings, build_tool_runner
from bot.tools.safety import neutralize_passage, sanitize_markdown
from bot.tools.search import format_sources
from bot.tools.sentiment import conversation_mood

__all__ = [
    "Tool", "ToolError", "ToolRegistry", "ToolResult", "ToolValidationError", "ToolOutcome", "ToolRunner",
    "ToolSettings", "build_tool_runner", "sanitize_markdown", "neutralize_passage", "format_sources",
    "conversation_mood",
]
