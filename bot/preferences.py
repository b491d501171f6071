"""Blind A/B votes, the pairs they make for preference training, and a leaderboard.

One preference store per deployment, in the same SQLite file as the conversations:

* ``votes``: a person compared two answers to one prompt (any two of base, adapters) and said
  A better, B better, tie, or both bad, maybe writing a better answer. Each vote keeps the full
  prompt that produced both answers (system prompt, history), who voted, and whether it was blind.
* corrections from the chat (``feedback.correction``) pair the better reply with the one it
  corrects.

``Preferences.pairs()`` turns both into TRL's preference format (``prompt`` as messages,
``chosen``, ``rejected``) for ``parley finetune dpo``. ``leaderboard()`` ranks the models by
Bradley-Terry strength over the votes (ties count half a win each way), with win rates and
Wilson 95% intervals. Only blind votes count for the leaderboard by default: a voter who knows
which side is the new adapter is not a fair judge.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from bot.errors import RequestError
from bot.store import Store

VERDICTS = ("a", "b", "tie", "both_bad")
MAX_ANSWER_CHARS = 8000

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    prompt TEXT NOT NULL,          -- JSON messages both answers were generated from
    model_a TEXT NOT NULL,         -- 'base' or an adapter name (what really answered, see ui/compare.py)
    model_b TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    verdict TEXT NOT NULL,         -- a, b, tie, both_bad
    better TEXT,                   -- a better answer the voter wrote
    blind INTEGER NOT NULL,        -- 1 when names were hidden until the vote
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_owner ON votes(owner, created_at);
"""


@dataclass(frozen=True)
class Standing:
    model: str
    strength: float
    """Bradley-Terry strength, scaled so the mean model is 1.0."""
    wins: float
    games: int
    win_rate: float
    low: float
    high: float
    """Wilson 95% interval of the win rate."""


class Preferences:
    """Votes and pairs over a Store's database."""

    def __init__(self, store: Store):
        self.store = store
        with store._conn() as conn:
            conn.executescript(SCHEMA)

    def add_vote(self, *, owner: str, prompt: list[dict[str, Any]], model_a: str, model_b: str, answer_a: str,
                 answer_b: str, verdict: str, better: str | None = None, blind: bool = True) -> str:
        """Store one comparison; RequestError names what is wrong with it."""
        if verdict not in VERDICTS:
            raise RequestError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        if not isinstance(prompt, list) or not prompt:
            raise RequestError("a vote needs the prompt both answers came from")
        if model_a == model_b:
            raise RequestError("both sides are the same model: pick two different ones to compare")
        better = (better or "").strip() or None
        if better is not None and len(better) > MAX_ANSWER_CHARS:
            raise RequestError(f"the better answer is {len(better)} characters; the limit is {MAX_ANSWER_CHARS}")
        vote_id = uuid.uuid4().hex
        self.store._write(
            "INSERT INTO votes (id, owner, prompt, model_a, model_b, answer_a, answer_b, verdict, better, blind,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (vote_id, owner, json.dumps(prompt), model_a, model_b, answer_a, answer_b, verdict, better,
             int(bool(blind)), time.time()))
        return vote_id

    def votes(self, owner: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM votes", ()
        if owner is not None:
            sql, args = sql + " WHERE owner = ?", (owner,)
        rows = self.store._conn().execute(sql + " ORDER BY created_at", args).fetchall()
        return [{**dict(r), "prompt": json.loads(r["prompt"]), "blind": bool(r["blind"])} for r in rows]

    # -- training pairs ------------------------------------------------------------------------
    def pairs(self) -> Iterator[dict[str, Any]]:
        """Preference pairs, TRL's format: {"prompt": messages, "chosen", "rejected", "source", "id"}.

        A vote for one side pairs it with the other; "both bad" with a better answer pairs that
        answer with each side; a tie or a "both bad" without one teaches no preference. A chat
        correction pairs the better reply with the reply it corrects, in the turn's own context.
        """
        for v in self.votes():
            answers = {"a": v["answer_a"], "b": v["answer_b"]}
            if v["verdict"] in ("a", "b"):
                other = "b" if v["verdict"] == "a" else "a"
                chosen = v["better"] or answers[v["verdict"]]
                yield {"prompt": v["prompt"], "chosen": chosen, "rejected": answers[other], "source": "vote",
                       "id": v["id"]}
            elif v["verdict"] == "both_bad" and v["better"]:
                for side in ("a", "b"):
                    yield {"prompt": v["prompt"], "chosen": v["better"], "rejected": answers[side], "source": "vote",
                           "id": f"{v['id']}:{side}"}
        rows = self.store._conn().execute(
            "SELECT turn_id, correction, MAX(id) AS last FROM feedback WHERE correction IS NOT NULL AND"
            " correction != '' GROUP BY turn_id ORDER BY last").fetchall()
        for row in rows:
            turn = self.store.get_turn(row["turn_id"])
            if turn.reply.strip() and turn.reply.strip() != row["correction"].strip():
                yield {"prompt": self.store.context_of(turn), "chosen": row["correction"], "rejected": turn.reply,
                       "source": "correction", "id": turn.id}

    # -- leaderboard -----------------------------------------------------------------------------
    def leaderboard(self, *, blind_only: bool = True, owner: str | None = None) -> list[Standing]:
        """Models ranked by Bradley-Terry strength over the votes (both_bad counts as a tie)."""
        games = [v for v in self.votes(owner) if v["blind"] or not blind_only]
        return rank(games)


def rank(votes: list[dict[str, Any]], iterations: int = 200) -> list[Standing]:
    """Bradley-Terry by minorization-maximization (Hunter 2004), ties as half a win to each side."""
    models = sorted({v["model_a"] for v in votes} | {v["model_b"] for v in votes})
    if not models:
        return []
    wins = {m: 0.0 for m in models}
    pair_games: dict[tuple[str, str], float] = {}
    played = {m: 0 for m in models}
    for v in votes:
        a, b = v["model_a"], v["model_b"]
        score_a = {"a": 1.0, "b": 0.0}.get(v["verdict"], 0.5)
        wins[a] += score_a
        wins[b] += 1.0 - score_a
        key = tuple(sorted((a, b)))
        pair_games[key] = pair_games.get(key, 0.0) + 1.0
        played[a] += 1
        played[b] += 1
    # A small prior (one tie against a virtual average model) keeps strengths finite when a model
    # won or lost every game.
    strength = {m: 1.0 for m in models}
    for _ in range(iterations):
        new = {}
        for m in models:
            denominator = 1.0 / (strength[m] + 1.0)  # the prior game against strength 1
            for (x, y), n in pair_games.items():
                if m in (x, y):
                    other = y if m == x else x
                    denominator += n / (strength[m] + strength[other])
            new[m] = (wins[m] + 0.5) / denominator
        mean = sum(new.values()) / len(new)
        strength = {m: s / mean for m, s in new.items()}
    out = []
    for m in models:
        n = played[m]
        rate = wins[m] / n if n else 0.0
        low, high = wilson(wins[m], n)
        out.append(Standing(model=m, strength=round(strength[m], 4), wins=wins[m], games=n, win_rate=round(rate, 4),
                            low=round(low, 4), high=round(high, 4)))
    return sorted(out, key=lambda s: -s.strength)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (ties counted as half a success)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n)), min(1.0, (centre + spread) / (1 + z * z / n))
