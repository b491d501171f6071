"""The preference store: votes with their prompt and voter, DPO pairs, the Bradley-Terry leaderboard."""

from __future__ import annotations

import pytest

from bot.errors import RequestError
from bot.preferences import Preferences, rank, wilson
from bot.store import Store

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def vote(prefs, verdict, a="base", b="tuned", better=None, blind=True, owner="user:x"):
    return prefs.add_vote(owner=owner, prompt=PROMPT, model_a=a, model_b=b, answer_a=f"answer of {a}",
                          answer_b=f"answer of {b}", verdict=verdict, better=better, blind=blind)


def test_votes_become_pairs_with_their_full_prompt(tmp_path):
    store = Store(tmp_path / "p.db")
    prefs = Preferences(store)
    vote(prefs, "b")
    vote(prefs, "a", better="4, exactly")
    vote(prefs, "tie")
    vote(prefs, "both_bad")  # no better answer: no preference to learn
    vote(prefs, "both_bad", better="It is 4.")
    pairs = list(prefs.pairs())
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("answer of tuned", "answer of base"), ("4, exactly", "answer of tuned"),
        ("It is 4.", "answer of base"), ("It is 4.", "answer of tuned")]
    assert all(p["prompt"] == PROMPT and p["source"] == "vote" for p in pairs)
    assert list(store.preference_pairs()) == pairs  # the entry point `finetune dpo --data preferences` reads


def test_a_chat_correction_pairs_with_the_reply_in_its_own_context(tmp_path):
    store = Store(tmp_path / "p.db")
    cid = store.create_conversation()
    turn = store.begin_turn(cid, messages=[{"role": "user", "content": "refund window?"}], model="m")
    given = [{"role": "system", "content": "SOURCES: [1] 45 days"}, {"role": "user", "content": "refund window?"}]
    store.finish_turn(turn, reply="30 days", finish_reason="stop", prompt=given)
    store.add_feedback(turn, -1, correction="45 days [1]")
    (pair,) = list(Preferences(store).pairs())
    assert pair == {"prompt": given, "chosen": "45 days [1]", "rejected": "30 days", "source": "correction",
                    "id": turn}
    # SFT rows from feedback use the same context, sources included.
    (row,) = list(store.feedback_examples())
    assert row["messages"][0]["content"] == "SOURCES: [1] 45 days"


def test_bad_votes_are_refused_and_nothing_is_stored(tmp_path):
    prefs = Preferences(Store(tmp_path / "p.db"))
    for kwargs, word in [({"verdict": "maybe"}, "verdict"), ({"b": "base"}, "same model"),
                         ({"verdict": "a", "better": "x" * 9000}, "limit")]:
        with pytest.raises(RequestError, match=word):
            vote(prefs, **{"verdict": "a", **kwargs})
    assert prefs.votes() == []


def test_leaderboard_ranks_the_better_model_first_with_intervals(tmp_path):
    prefs = Preferences(Store(tmp_path / "p.db"))
    for _ in range(8):
        vote(prefs, "b")
    for _ in range(2):
        vote(prefs, "a")
    vote(prefs, "a", blind=False)  # a voter who saw the names: not counted
    board = prefs.leaderboard()
    assert [s.model for s in board] == ["tuned", "base"]
    tuned = board[0]
    assert tuned.games == 10 and tuned.win_rate == 0.8 and tuned.low < 0.8 < tuned.high
    assert board[0].strength > 1 > board[1].strength
    assert len(prefs.leaderboard(blind_only=False)) == 2 and prefs.leaderboard(blind_only=False)[0].games == 11


def test_bradley_terry_and_wilson_against_known_values():
    # Three models in a strict order: the ranking follows it and a model that never won stays finite.
    votes = [{"model_a": "a", "model_b": "b", "verdict": "a"}] * 3 + \
            [{"model_a": "b", "model_b": "c", "verdict": "a"}] * 3 + \
            [{"model_a": "a", "model_b": "c", "verdict": "a"}] * 3
    board = rank(votes)
    assert [s.model for s in board] == ["a", "b", "c"] and board[-1].strength > 0
    low, high = wilson(8, 10)
    assert round(low, 3) == 0.490 and round(high, 3) == 0.943  # the textbook Wilson interval for 8/10
