"""Integration latency: from an incoming Slack/Discord event to the first visible reply text.

Runs the real Assistant on the embedded SmolLM2-135M model behind the Slack and Discord adapters,
with the platforms replaced by the local mock servers of the test suite (127.0.0.1 only):

- Slack: a signed ``app_mention`` event dispatched to the bolt App -> the first ``chat.postMessage``
  the mock Web API receives (and the last ``chat.update``: the finished reply).
- Discord: a real ``discord.Message`` handed to the client -> the first message POST the mock REST
  API receives (and the last edit).

Platform network time is not included (the mocks answer in about a millisecond); add your
round-trip to Slack/Discord. Prints a table and writes JSON (default
bench/results/integrations.json). Not a test.

    python bench/integrations.py --runs 5 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bot.assistant import Assistant  # noqa: E402
from bot.engine import Engine, GenerationParams  # noqa: E402
from bot.models import load_model  # noqa: E402
from bot.store import Store  # noqa: E402

QUESTIONS = ["What is a LoRA adapter, in two sentences?", "Give me three tips for writing clear emails.",
             "Explain what a hash table is.", "How do I reverse a list in Python?",
             "Summarize why unit tests matter."]


def bench_slack(assistant, store, runs: int, params: GenerationParams) -> list[dict]:
    from tests.unit.mock_slack_api import MockSlackApi
    from tests.unit.test_slack import SECRET, dispatch, event_body, mention

    from bot.integrations import slack

    api = MockSlackApi().start()
    rows = []
    try:
        app = slack.build_slack_app(assistant, store, client=slack.make_client("xoxb-bench", base_url=api.url),
                                    signing_secret=SECRET, process_before_response=True, params=params)
        for i in range(runs):
            before = len(api.calls)
            started = time.monotonic()
            dispatch(app, event_body(mention(text=f"<@UBOT> {QUESTIONS[i % len(QUESTIONS)]}", ts=f"{i + 1}.0"),
                                     f"EvBench{i}"))
            ended = time.monotonic()
            calls = api.calls[before:]
            posts = [c for c in calls if c.method == "chat.postMessage"]
            writes = [c for c in calls if c.method in ("chat.postMessage", "chat.update")]
            rows.append({"first_post_s": posts[0].at - started if posts else None,
                         "last_write_s": writes[-1].at - started if writes else None,
                         "handled_s": ended - started, "api_writes": len(writes)})
    finally:
        api.stop()
    return rows


def bench_discord(assistant, store, runs: int, params: GenerationParams) -> list[dict]:
    from tests.unit.mock_discord_api import BOT_ID, discord_api, make_message

    from bot.integrations.discord import ParleyDiscord

    async def main():
        rows = []
        async with discord_api() as mock:
            client = ParleyDiscord(assistant, store, sync_commands=False, params=params)
            try:
                await client.login("x")
                for i in range(runs):
                    message = make_message(client, mock, f"<@{BOT_ID}> {QUESTIONS[i % len(QUESTIONS)]}")
                    before = len(mock.calls)
                    started = time.monotonic()
                    await client.handle_message(message)
                    ended = time.monotonic()
                    calls = mock.calls[before:]
                    posts = [c for c in calls if c.method == "POST" and c.path.endswith("/messages")]
                    writes = [c for c in calls if c.method in ("POST", "PATCH") and "/messages" in c.path]
                    rows.append({"first_post_s": posts[0].at - started if posts else None,
                                 "last_write_s": writes[-1].at - started if writes else None,
                                 "handled_s": ended - started, "api_writes": len(writes)})
            finally:
                await client.close()
        return rows

    return asyncio.run(main())


def summarize(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None,
                        help="PARLEY_HOME with the converted model (default PARLEY_HOME or a temp dir)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "integrations.json")
    args = parser.parse_args()

    home = args.home or Path(os.environ.get("PARLEY_HOME") or tempfile.mkdtemp(prefix="parley-bench-"))
    t0 = time.perf_counter()
    loaded = load_model(args.model, home, device="cpu", progress=False)
    engine = Engine(loaded)
    load_s = time.perf_counter() - t0
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "parley.db")
        assistant = Assistant(engine, store=store)
        # Warm-up so the first measured run does not pay for lazy initialisation.
        list(assistant.respond([{"role": "user", "content": "hi"}], None))
        for name, fn in (("slack", bench_slack), ("discord", bench_discord)):
            rows = fn(assistant, store, args.runs, params)
            results[name] = {"runs": rows, "first_post_s": summarize(rows, "first_post_s"),
                             "last_write_s": summarize(rows, "last_write_s")}
    engine.close()

    print(f"model {args.model} on CPU ({os.cpu_count()} cores), load {load_s:.1f} s, "
          f"{args.runs} runs, max_new_tokens={args.max_new_tokens}, greedy")
    print(f"{'platform':<10}{'first reply text (median / min / max) s':>42}{'finished reply (median) s':>28}")
    for name, res in results.items():
        fp, lw = res["first_post_s"], res["last_write_s"]
        print(f"{name:<10}{fp['median']!s:>20} / {fp['min']!s:>7} / {fp['max']!s:>7}{lw['median']!s:>28}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "seconds from an incoming platform event to the first chat.postMessage / Discord message POST "
                "(first visible reply text) and to the last edit, mocked platform APIs on 127.0.0.1",
        "model": args.model, "device": "cpu", "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "max_new_tokens": args.max_new_tokens, "runs": args.runs, "model_load_s": round(load_s, 2),
        "results": results}, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
