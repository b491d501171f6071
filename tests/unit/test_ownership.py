"""Each person's chats are their own: two API keys on a real server, and the store's checks.

Neither person sees, lists, extends, rates or deletes the other's conversations; someone else's id
is a 404 that looks exactly like an id that does not exist. Admin actions need an admin.
"""

from __future__ import annotations

import httpx
import pytest

from bot.api import create_app
from bot.errors import NotFoundError
from bot.owners import Access, ForbiddenError, Identity, UnauthorizedError
from bot.store import Store
from tests.helpers import build_test_runtime, running_server

ALICE, BOB = "alice-key-123", "bob-key-456"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("owners-home")
    runtime = build_test_runtime(tiny_model_dir, home, api_keys=f"alice:{ALICE},bob:{BOB}", admins="alice",
                                 max_new_tokens_cap=8)
    with running_server(create_app(runtime)) as url:
        yield url, runtime
    runtime.engine.close()


def call(url, key, method, path, body=None):
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, url + path, json=body, headers=headers, timeout=120)


def chat(url, key, text="hi", **extra):
    return call(url, key, "POST", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, **extra})


def test_two_api_keys_never_see_each_others_conversations(server):
    url, runtime = server
    a = chat(url, ALICE, "alice's secret plan").json()
    b = chat(url, BOB, "bob's question").json()
    a_turn, b_turn = a["parley"]["turn_id"], b["parley"]["turn_id"]
    a_conv = runtime.store.get_turn(a_turn).conversation_id
    b_conv = runtime.store.get_turn(b_turn).conversation_id

    # List: each sees only their own.
    a_list = {c["id"] for c in call(url, ALICE, "GET", "/v1/conversations").json()["data"]}
    b_list = {c["id"] for c in call(url, BOB, "GET", "/v1/conversations").json()["data"]}
    assert a_conv in a_list and b_conv not in a_list
    assert b_conv in b_list and a_conv not in b_list

    # Read: someone else's conversation is the same 404 as one that does not exist.
    assert call(url, ALICE, "GET", f"/v1/conversations/{a_conv}").json()["turns"][0]["reply"] is not None
    theirs = call(url, BOB, "GET", f"/v1/conversations/{a_conv}")
    missing = call(url, BOB, "GET", "/v1/conversations/0123456789abcdef")
    assert theirs.status_code == missing.status_code == 404
    assert "secret plan" not in theirs.text

    # Extend: Bob cannot append a turn to Alice's conversation.
    r = chat(url, BOB, "let me in", conversation_id=a_conv)
    assert r.status_code == 404
    assert len(runtime.store.turns(a_conv)) == 1
    # ...but Alice can continue her own.
    assert chat(url, ALICE, "and then?", conversation_id=a_conv).status_code == 200
    assert len(runtime.store.turns(a_conv)) == 2

    # Feedback: Bob cannot rate Alice's reply (it would become training data).
    r = call(url, BOB, "POST", "/v1/feedback", {"turn_id": a_turn, "rating": -1})
    assert r.status_code == 404 and runtime.store.feedback(a_turn) == []
    assert call(url, ALICE, "POST", "/v1/feedback", {"turn_id": a_turn, "rating": 1}).status_code == 200
    assert runtime.store.feedback(a_turn)[0]["user"] == "user:alice"

    # Delete: Bob cannot delete it; Alice can.
    assert call(url, BOB, "DELETE", f"/v1/conversations/{a_conv}").status_code == 404
    assert runtime.store.get_conversation(a_conv)
    assert call(url, ALICE, "DELETE", f"/v1/conversations/{a_conv}").status_code == 200
    with pytest.raises(NotFoundError):
        runtime.store.get_conversation(a_conv)
    # Alice is the admin: she may erase someone else's data (Bob asked her to); Bob still may not read it.
    assert call(url, ALICE, "DELETE", f"/v1/conversations/{b_conv}").status_code == 200
    with pytest.raises(NotFoundError):
        runtime.store.get_conversation(b_conv)


def test_admin_actions_need_an_admin(server, tmp_path):
    url, runtime = server
    for method, path, body in [("POST", "/v1/train", {"max_steps": 1}),
                               ("POST", "/v1/adapters", {"name": "x", "path": str(tmp_path)}),
                               ("DELETE", "/v1/adapters/x", None),
                               ("DELETE", "/v1/train/x", None)]:
        r = call(url, BOB, method, path, body)
        assert r.status_code == 403, (method, path, r.text)
        assert "admin" in r.json()["error"]["message"]
    # Alice is the admin: her request passes the role check and fails on its own merits.
    assert call(url, ALICE, "DELETE", "/v1/adapters/x").status_code == 404


def test_wrong_or_missing_key(server):
    url, _ = server
    assert call(url, "nope", "GET", "/v1/conversations").status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401


def test_store_checks_the_owner_on_every_call(tmp_path):
    store = Store(tmp_path / "p.db")
    cid = store.create_conversation(owner="user:a")
    turn = store.add_turn(cid, messages=[{"role": "user", "content": "x"}], reply="y", model="m")
    for fn in (lambda: store.get_conversation(cid, "user:b"), lambda: store.turns(cid, "user:b"),
               lambda: store.history(cid, "user:b"), lambda: store.truncate_after(cid, 0, "user:b"),
               lambda: store.delete_conversation(cid, "user:b"), lambda: store.add_feedback(turn, 1, owner="user:b")):
        with pytest.raises(NotFoundError):
            fn()
    assert len(store.turns(cid, "user:a")) == 1  # nothing above changed anything
    assert store.list_conversations(owner="user:b") == []
    assert [c["id"] for c in store.list_conversations(owner="user:a")] == [cid]


def test_old_databases_get_an_owner_column(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '',"
                       " source TEXT NOT NULL DEFAULT 'web', external_key TEXT, created_at REAL NOT NULL,"
                       " updated_at REAL NOT NULL);"
                       "INSERT INTO conversations VALUES ('old', 't', 'cli', NULL, 1, 1);")
    conn.close()
    store = Store(db)
    assert store.get_conversation("old", "local")["title"] == "t"  # the single local user's, as before


def test_one_thumbs_up_does_not_outvote_many_thumbs_down(tmp_path):
    store = Store(tmp_path / "p.db")
    cid = store.create_conversation()
    turn = store.add_turn(cid, messages=[{"role": "user", "content": "q"}], reply="bad answer", model="m")
    store.add_feedback(turn, 1, user="a")
    store.add_feedback(turn, -1, user="b")
    store.add_feedback(turn, -1, user="c")
    assert list(store.feedback_examples()) == []
    # Each person's latest vote counts once: b and c change their minds.
    store.add_feedback(turn, 1, user="b")
    store.add_feedback(turn, 1, user="c")
    assert [r["turn_id"] for r in store.feedback_examples()] == [turn]
    # A correction trains the corrected reply whatever the votes, and is bounded in length.
    store.add_feedback(turn, -1, user="d", correction="the better answer")
    assert list(store.feedback_examples())[0]["messages"][-1]["content"] == "the better answer"
    from bot.errors import RequestError

    with pytest.raises(RequestError, match="limit"):
        store.add_feedback(turn, -1, correction="x" * 100_000)


def test_access_rules():
    access = Access(api_key="K", auth="alice:pw,bob:pw2")
    assert access.api_identity("Bearer K") == Identity("user:alice", admin=True)
    with pytest.raises(UnauthorizedError):
        access.api_identity("Bearer wrong")
    assert access.check_login("alice", "pw") and access.check_login("alice", "K")  # the key logs in too
    assert not access.check_login("bob", "pw") and not access.check_login("eve", "")
    assert access.web_identity("bob", None) == Identity("user:bob", admin=False)
    with pytest.raises(ForbiddenError):
        Identity("user:bob").require_admin("training")
    # Without auth: a browser is its random id; admin only on loopback; a public bind is refused.
    open_local = Access()
    assert open_local.web_identity(None, "A" * 24) == Identity("browser:" + "A" * 24, admin=True)
    with pytest.raises(UnauthorizedError):
        open_local.web_identity(None, "../../x")
    assert Access(host="0.0.0.0", insecure_public=True).web_identity(None, "B" * 24).admin is False
    from bot.errors import ConfigError

    with pytest.raises(ConfigError, match="public address"):
        Access(host="0.0.0.0").check_startup()
    Access(host="0.0.0.0", auth="a:b").check_startup()


def test_hugging_face_sign_in_on_a_space_owns_the_data():
    import time

    from starlette.requests import Request

    from ui.session import hf_username

    signed_in = Request({"type": "http", "session": {"oauth_info": {
        "userinfo": {"preferred_username": "carol"}, "expires_at": time.time() + 60}}})
    expired = Request({"type": "http", "session": {"oauth_info": {
        "userinfo": {"preferred_username": "carol"}, "expires_at": time.time() - 1}}})
    no_sessions = Request({"type": "http"})

    import gradio as gr

    def GradioRequest(request):  # what Gradio hands a handler
        return gr.Request(request=request)

    assert hf_username(GradioRequest(signed_in)) == "carol"
    assert hf_username(GradioRequest(expired)) is None and hf_username(GradioRequest(no_sessions)) is None
    space = Access(host="0.0.0.0", insecure_public=True, oauth=True, admins="carol")
    assert space.web_identity(None, "C" * 24, hf_user="carol") == Identity("hf:carol", admin=True)
    assert space.web_identity(None, "C" * 24, hf_user="dave") == Identity("hf:dave", admin=False)
    # Not signed in: the browser's own data, and no admin on a public Space.
    assert space.web_identity(None, "C" * 24, hf_user=None) == Identity("browser:" + "C" * 24, admin=False)
