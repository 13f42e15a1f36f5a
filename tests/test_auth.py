"""Auth: with a token configured every request must carry it (HTTP: Bearer
header; JSON lines: ``auth`` first); ``/healthz`` needs none; per-agent
tokens may act only as their own agent (``forbidden``); without any token
the daemon will not listen beyond loopback unless told ``--insecure``."""

from __future__ import annotations

import json

import pytest
import trio

from .daemon import busd_command, run_to_exit
from .wireclients import HttpClient, JsonLinesClient, http_transport, jsonl_transport, refusal

TOKENS_FILE = """\
# TOKEN AGENT
tok-alice alice
tok-bob   bob     # trailing comment
tok-admin *
"""


async def wrong_auth(t, token):
    """Present a wrong token: JSON lines refuses ``auth`` itself; HTTP only
    sends it along with the next requests."""
    if t.name == "jsonl":
        await refusal(t.auth(token), "unauthorized")
    else:
        await t.auth(token)


@pytest.fixture
async def per_agent(start_bus, tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKENS_FILE)
    return await start_bus(tokens_file=str(path), token="shared")


async def test_every_request_needs_the_token(start_bus, connect):
    ep = await start_bus(token="s3cret")
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            await refusal(t.send(from_="a", to="b", body="x"), "unauthorized")
            await refusal(t.inbox("b"), "unauthorized")
            await refusal(t.ack("b", 1), "unauthorized")
            await wrong_auth(t, "wrong")
            await refusal(t.send(from_="a", to="b", body="x"), "unauthorized")
            await refusal(t.inbox("b"), "unauthorized")
            assert await t.auth("s3cret") == {"ok": True}
            r = await t.send(from_="a", to="b", body="x")
            assert [m["id"] for m in await t.inbox("b")] == [r["id"]]


async def test_jsonl_every_method_needs_auth_first(start_bus):
    ep = await start_bus(token="s3cret")
    with trio.fail_after(5):
        async with jsonl_transport(ep.port) as t:
            for method in ("agents", "stats", "ping"):
                await refusal(getattr(t, method)(), "unauthorized")
            await t.auth("s3cret")
            assert (await t.ping())["pong"] is True
            await t.agents()
            await t.stats()


async def test_http_needs_bearer_token(start_bus):
    ep = await start_bus(token="s3cret")
    with trio.fail_after(5):
        async with HttpClient(ep.port) as c:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0"}):
                resp = await c.get("/api/inbox/b", headers=headers)
                assert resp.status == 401 and resp.json()["error"]["code"] == "unauthorized", headers
            resp = await c.get("/api/inbox/b", headers={"authorization": "Bearer s3cret"})
            assert resp.status == 200 and resp.json()["ok"] is True


async def test_healthz_needs_no_token(start_bus):
    ep = await start_bus(token="s3cret")
    with trio.fail_after(5):
        async with HttpClient(ep.port) as c:
            for headers in ({}, {"authorization": "Bearer wrong"}):
                resp = await c.get("/healthz", headers=headers)
                assert resp.status == 200 and resp.json()["ok"] is True


async def test_agent_token_acts_only_as_its_agent(per_agent, connect):
    with trio.fail_after(5):
        async with connect(per_agent.port) as admin:
            await admin.auth("tok-admin")
            for_bob = await admin.send(from_="carol", to="bob", body="for bob")
        async with connect(per_agent.port) as alice:
            await alice.auth("tok-alice")
            mine = await alice.send(from_="alice", to="bob", body="from alice")
            await alice.send(from_="alice", to="ALL", body="broadcast as myself")
            await refusal(alice.send(from_="bob", to="alice", body="spoofed"), "forbidden")
            await refusal(alice.send(from_="carol", to="ALL", body="spoofed"), "forbidden")
            await refusal(alice.inbox("bob"), "forbidden")
            await refusal(alice.ack("bob", mine["id"]), "forbidden")
            assert await alice.inbox("alice") == []
        async with connect(per_agent.port) as bob:
            await bob.auth("tok-bob")
            assert [m["id"] for m in await bob.inbox("bob")] == [for_bob["id"], mine["id"]]  # nothing acked
            assert [m["from"] for m in await bob.inbox("bob")] == ["carol", "alice"]  # nothing spoofed


async def test_admin_and_shared_tokens_act_as_anyone(per_agent, connect):
    with trio.fail_after(5):
        for token in ("tok-admin", "shared"):
            async with connect(per_agent.port) as t:
                await t.auth(token)
                r = await t.send(from_="bob", to="alice", body=token)
                assert [m["id"] for m in await t.inbox("alice")] == [r["id"]]
                await t.ack("alice", r["id"])
                assert await t.inbox("alice") == []


async def test_unknown_token_is_unauthorized_not_forbidden(per_agent, connect):
    with trio.fail_after(5):
        async with connect(per_agent.port) as t:
            await wrong_auth(t, "tok-nobody")
            await refusal(t.send(from_="alice", to="bob", body="x"), "unauthorized")
            await refusal(t.inbox("alice"), "unauthorized")


async def test_jsonl_agent_token_cannot_ack_others_by_ids(per_agent):
    with trio.fail_after(5):
        async with jsonl_transport(per_agent.port) as t:
            await t.auth("tok-alice")
            r = await t.send(from_="alice", to="bob", body="x")
            await refusal(t.ack("bob", ids=[r["id"]]), "forbidden")
            await refusal(t.inbox("bob", ack=r["id"]), "forbidden")
        async with http_transport(per_agent.port) as t:
            await t.auth("tok-bob")
            assert [m["id"] for m in await t.inbox("bob")] == [r["id"]]


async def test_no_token_means_loopback_only(tmp_path):
    """``busd serve --host 0.0.0.0`` without a token exits with an error
    instead of listening (nothing is bound, so this is safe to run)."""
    done = await run_to_exit(busd_command(str(tmp_path / "bus.db"), "--host", "0.0.0.0", "--port", "0"))
    assert done.code != 0
    assert "token" in done.stderr and "insecure" in done.stderr, done.stderr
    assert not (tmp_path / "bus.db").exists()


async def test_jsonl_auth_replies(start_bus):
    ep = await start_bus(token="s3cret")
    with trio.fail_after(5):
        async with JsonLinesClient(ep.port) as c:
            ok = await c.call("auth", {"token": "s3cret"})
            assert ok == {"jsonrpc": "2.0", "id": ok["id"], "result": {"ok": True}}
            bad = await c.call("auth", {"token": "nope"})
            assert bad["error"]["data"]["reason"] == "unauthorized"


async def test_jsonl_auth_pipelined_with_the_requests_it_allows(start_bus):
    """``auth`` and what follows written in one go: auth still comes first."""
    ep = await start_bus(token="s3cret")
    lines = [
        {"id": 1, "method": "auth", "params": {"token": "s3cret"}},
        {"id": 2, "method": "send", "params": {"from": "a", "to": "b", "body": "x"}},
        {"id": 3, "method": "inbox", "params": {"agent": "b"}},
    ]
    with trio.fail_after(5):
        async with JsonLinesClient(ep.port) as c:
            await c.send_raw(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
            replies = [await c.reply_to(i) for i in (1, 2, 3)]
            assert all("result" in r for r in replies), replies
            assert [m["id"] for m in replies[2]["result"]["messages"]] == [replies[1]["result"]["id"]]
