"""The built-in tools as plain typed functions: search, translate, sentiment.

Each factory closes over its backend and returns a function whose signature and docstring
become the tool's JSON schema. What a turn decides in code (which index, the cancel flag, a
query embedding the router already computed) reaches the tools through ``TurnContext``, never
through the model's arguments: the model cannot pick another index or reach the filesystem.
"""

from __future__ import annotations

from typing import Callable

from bot.tools.registry import ToolError, ToolResult
from bot.tools.search import DocumentSearch, sources_block
from bot.tools.sentiment import SentimentAnalyzer, format_report
from bot.tools.translate import Translator
from bot.tools.turn import TurnContext, current_turn  # noqa: F401  (TurnContext: re-exported)


def make_search_tool(search: DocumentSearch) -> Callable[..., ToolResult]:
    def search_documents(query: str, k: int = 4) -> ToolResult:
        """Search the user's own documents and return numbered passages to cite as [1], [2].

        Args:
            query: What to look for, in natural language or keywords.
            k: How many passages to return, 1 to 8.
        """
        if not 1 <= k <= 8:
            raise ToolError(f"k={k} is out of range: ask for 1 to 8 passages")
        if not query.strip():
            raise ToolError("the search query is empty")
        ctx = current_turn()
        vector = ctx.query_vector if ctx.query_for_vector == query else None
        sources = search.search(query, ctx.collections, k, owner=ctx.owner, query_vector=vector)
        where = list(ctx.collections)
        if not sources:
            return ToolResult(text=f"No passages in the documents match {query!r}.",
                              summary=f"no passages found in {', '.join(where)}",
                              data={"sources": [], "collections": where, "query": query})
        titles = ", ".join(dict.fromkeys(s["title"] or s["source"] for s in sources))
        return ToolResult(text=sources_block(sources), summary=f"{len(sources)} passages from {titles}"[:200],
                          data={"sources": sources, "collections": where, "query": query}, sources=sources)

    return search_documents


def make_translate_tool(translator: Translator) -> Callable[..., ToolResult]:
    def translate(text: str, target: str, source: str | None = None) -> ToolResult:
        """Translate text into another language, keeping paragraphs and line breaks.

        Args:
            text: The text to translate.
            target: The language to translate into, as a name or code (French, fr).
            source: The text's language if known; detected when left out.
        """
        ctx = current_turn()
        result = translator.translate(text, target, source, cancel=ctx.cancel, deadline=ctx.deadline)
        data = result.to_dict()
        how = "detected" if result.detected else "given"
        summary = f"{result.source.name} ({how}) -> {result.target.name} by {result.backend}"
        return ToolResult(text=result.text, summary=summary, data=data)

    return translate


def make_sentiment_tool(analyzer: SentimentAnalyzer) -> Callable[..., ToolResult]:
    def sentiment(text: str) -> ToolResult:
        """How positive, neutral or negative a text is, overall and sentence by sentence.

        Args:
            text: The text to rate, e.g. a review or a message.
        """
        if not text.strip():
            raise ToolError("there is no text to rate")
        report = analyzer.analyze(text)
        o = report.overall
        return ToolResult(text=format_report(report), summary=f"{o.label} ({o.compound:+.2f}, {report.backend})",
                          data=report.to_dict())

    return sentiment
