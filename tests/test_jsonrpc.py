"""JSON lines, the native protocol: JSON-RPC 2.0 framing and error codes,
request ids, out-of-order replies, pipelined order, the 1 MiB line cap,
the netcat session, and the methods beyond send/inbox."""

from __future__ import annotations

import json
import re

import pytest
import trio

from .wireclients import (
    HTTP_STATUS,
    JsonLinesClient,
    Witness,
    exchange_raw,
    jsonl_transport,
    pipelined_sends,
    read_until_eof,
    wait_for_waiters,
)

MIB = 1024 * 1024
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602


def assert_error(reply, code, rid, reason=None):
    """A JSON-RPC error reply with ``code`` for request ``rid``, carrying a
    contract reason in ``data``."""
    assert reply["jsonrpc"] == "2.0" and reply["id"] == rid and "result" not in reply, reply
    err = reply["error"]
    assert err["code"] == code and isinstance(err["message"], str), reply
    assert err["data"]["reason"] in HTTP_STATUS, reply
    if reason is not None:
        assert err["data"]["reason"] == reason, reply


async def test_netcat_session(bus):
    """The contract's session, byte for byte: one line in, one line out."""
    request = b'{"id":1,"method":"send","params":{"from":"a","to":"b","body":"hi"}}\n'
    expected = re.compile(
        rb'\{"jsonrpc":"2\.0","id":1,"result":\{"id":1,'
        rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z","recipients":1\}\}\n'
    )
    with trio.fail_after(5):
        async with JsonLinesClient(bus.port) as c:
            await c.send_raw(request)
            line = await c.read_line()
            assert expected.fullmatch(line + b"\n"), line


async def test_requests_then_eof_are_all_answered(bus):
    """``printf '...\\n...\\n' | nc``: the client half-closes right after
    writing; every request is still answered before the bus closes."""
    lines = b'{"id":1,"method":"send","params":{"from":"a","to":"b","body":"hi"}}\n{"id":2,"method":"ping"}\n'
    with trio.fail_after(5):
        replies = [json.loads(x) for x in (await exchange_raw(bus.port, lines)).splitlines()]
        assert sorted(r["id"] for r in replies) == [1, 2]
        assert all("result" in r for r in replies), replies


@pytest.mark.parametrize("opening", [b" ", b"\n", b"\r\n", b"\t \n\n"])
async def test_leading_whitespace_means_json_lines(bus, opening):
    with trio.fail_after(5):
        async with JsonLinesClient(bus.port) as c:
            await c.send_raw(opening + b'{"jsonrpc":"2.0","id":"p","method":"ping"}\n')
            reply = await c.read_reply()
            assert reply["id"] == "p" and reply["result"]["pong"] is True


async def test_jsonrpc_member_may_be_omitted(jl):
    with trio.fail_after(5):
        await jl.send_raw(b'{"id":5,"method":"send","params":{"from":"a","to":"b","body":"x"}}\n')
        reply = await jl.read_reply()
        assert reply["jsonrpc"] == "2.0" and reply["id"] == 5 and reply["result"]["recipients"] == 1


@pytest.mark.parametrize("rid", [0, 7, -3, 2**53, "seven", "", "ключ 😀"])
async def test_replies_carry_the_request_id(jl, rid):
    with trio.fail_after(5):
        ok = await jl.reply_to(await jl.request("ping", {}, rid=rid))
        assert ok["id"] == rid and ok["result"]["pong"] is True
        refused = await jl.reply_to(await jl.request("send", {"from": "a"}, rid=rid))
        assert_error(refused, INVALID_PARAMS, rid, "bad_request")
        unknown = await jl.reply_to(await jl.request("nosuch", {}, rid=rid))
        assert_error(unknown, METHOD_NOT_FOUND, rid)


@pytest.mark.parametrize(
    "line", [b"{not json}", b'{"id":1,"method":"ping"', b"{'id':1}", b'{"id":1,"method":"ping"}}', b"{\xff}", b"{"]
)
async def test_parse_error(jl, line):
    with trio.fail_after(5):
        await jl.send_raw(line + b"\n")
        assert_error(await jl.read_reply(), PARSE_ERROR, None, "bad_request")
        assert (await jl.call("ping"))["result"]["pong"] is True  # the connection goes on


@pytest.mark.parametrize("line", [b'{"id":1}}', b'{"id":1,"method":5,', b'{"method":"ping","id":[1 ', b"[1,2"])
async def test_invalid_json_is_a_parse_error_even_if_also_the_wrong_shape(jl, line):
    with trio.fail_after(5):
        assert (await jl.call("ping"))["result"]["pong"] is True
        await jl.send_raw(line + b"\n")
        assert_error(await jl.read_reply(), PARSE_ERROR, None, "bad_request")


@pytest.mark.parametrize(
    "line",
    [
        b'{"id":1}',
        b'{"id":1,"method":5}',
        b'{"id":1,"method":null}',
        b'{"id":1,"method":"ping","jsonrpc":"1.0"}',
        b'{"id":[1],"method":"ping"}',
        b'{"id":{"a":1},"method":"ping"}',
        b'{"id":1.5,"method":"ping"}',
        b'{"id":true,"method":"ping"}',
        b"[]",
        b"42",
        b'"ping"',
        b"null",
    ],
)
async def test_invalid_request(jl, line):
    with trio.fail_after(5):
        assert (await jl.call("ping"))["result"]["pong"] is True  # a valid first line: this is JSON lines
        await jl.send_raw(line + b"\n")
        reply = await jl.read_reply()
        assert_error(reply, INVALID_REQUEST, reply["id"])
        assert reply["id"] in (None, 1), reply  # null unless the id could be read
        assert (await jl.call("ping"))["result"]["pong"] is True


async def test_unknown_method(jl):
    with trio.fail_after(5):
        for method in ("nosuch", "Send", "", "send "):
            rid = await jl.request(method, {})
            assert_error(await jl.reply_to(rid), METHOD_NOT_FOUND, rid)


@pytest.mark.parametrize(
    "method, params",
    [
        ("send", None),
        ("send", {}),
        ("send", {"from": "a", "to": "b", "body": 5}),
        ("send", {"from": "a", "to": "b", "body": "x", "subject": None}),
        ("send", {"from": 1, "to": "b", "body": "x"}),
        ("send", [("a", "b", "x")]),
        ("send", "a b x"),
        ("inbox", {}),
        ("inbox", {"agent": "b", "limit": 0}),
        ("inbox", {"agent": "b", "limit": 1001}),
        ("inbox", {"agent": "b", "wait": 61}),
        ("inbox", {"agent": "b", "wait": -1}),
        ("inbox", {"agent": "b", "wait": "1"}),
        ("ack", {"agent": "b", "up_to": "1"}),
        ("auth", {}),
        ("auth", {"token": 1}),
    ],
)
async def test_invalid_params(jl, method, params):
    with trio.fail_after(5):
        rid = await jl.request(method, params)
        assert_error(await jl.reply_to(rid), INVALID_PARAMS, rid, "bad_request")


async def test_replies_come_out_of_order(bus, jl):
    """A long ``wait`` does not hold up later requests on the connection."""
    with trio.fail_after(5):
        poll = await jl.request("inbox", {"agent": "b", "wait": 30})
        ping = await jl.request("ping", {})
        first = await jl.read_reply()
        assert first["id"] == ping and first["result"]["pong"] is True
        async with jsonl_transport(bus.port) as other:
            sent = await other.send(from_="a", to="b", body="now answer the poll")
        second = await jl.read_reply()
        assert second["id"] == poll and [m["id"] for m in second["result"]["messages"]] == [sent["id"]]


async def test_pipelined_sends_commit_in_the_order_written(jl):
    n = 200
    with trio.fail_after(10):
        await jl.send_raw(pipelined_sends(["b"] * n))  # written at once, before reading anything
        replies = [await jl.reply_to(i) for i in range(n)]
        ids = [r["result"]["id"] for r in replies]
        assert ids == sorted(set(ids)), ids
        inbox = (await jl.call("inbox", {"agent": "b", "limit": 1000}))["result"]["messages"]
        assert [(m["id"], m["body"]) for m in inbox] == [(id_, str(i)) for i, id_ in enumerate(ids)]


async def test_a_line_of_one_mib_is_still_a_line(jl):
    head, tail = b'{"id":1,"method":"ping"', b"}"
    line = head + b" " * (MIB - len(head) - len(tail)) + tail
    assert len(line) == MIB
    with trio.fail_after(10):
        await jl.send_raw(line + b"\n")
        assert (await jl.read_reply())["result"]["pong"] is True
        assert (await jl.call("ping"))["result"]["pong"] is True


@pytest.mark.parametrize("newline", [False, True], ids=["unterminated", "terminated"])
async def test_a_line_over_one_mib_is_an_error_and_closes(bus, newline):
    witness = await Witness(bus.port).plant()
    line = b'{"id":1,"method":"send","params":{"from":"a","to":"b","body":"' + b"x" * MIB + b'"}}'
    with trio.fail_after(10):
        async with JsonLinesClient(bus.port) as c:
            try:
                await c.send_raw(line + (b"\n" if newline else b""))
            except trio.BrokenResourceError:
                pass  # the bus may close before reading it all
            rest = await read_until_eof(c.stream)
        replies = [json.loads(x) for x in rest.splitlines()]
        assert len(replies) == 1, rest[:300]
        assert "error" in replies[0] and replies[0]["error"]["data"]["reason"] in HTTP_STATUS
        await witness.check()
        async with jsonl_transport(bus.port) as t:
            assert await t.inbox("b") == []


async def test_ping_agents_and_stats(bus):
    with trio.fail_after(5):
        async with jsonl_transport(bus.port) as t:
            pong = await t.ping()
            assert pong["pong"] is True and isinstance(pong["time"], str)
            sent = await t.send(from_="a", to="b", body="x")
            await t.inbox("c")
            agents = {a["name"]: a for a in await t.agents()}
            assert {"a", "b", "c"} <= set(agents)
            for a in agents.values():
                assert set(a) == {"name", "last_seen", "unread"}, a
            assert (agents["a"]["unread"], agents["b"]["unread"], agents["c"]["unread"]) == (0, 1, 0)
            assert isinstance(agents["a"]["last_seen"], str) and isinstance(agents["c"]["last_seen"], str)
            stats = await t.stats()
            assert stats["last_id"] == sent["id"] and stats["unread"] == 1


async def test_stats_waiters_counts_only_polls_waiting_now(bus):
    """protocol.md: ``waiters`` counts only long-polls that are waiting right
    now; a read that has returned no longer counts."""
    with trio.fail_after(5):
        async with jsonl_transport(bus.port) as t, JsonLinesClient(bus.port) as poller:
            await t.send(from_="a", to="b", body="x")
            await t.inbox("b")  # returns with mail
            await t.inbox("c", wait=0.1)  # returns by time-out
            assert (await t.stats())["waiters"] == 0
            poll = await poller.request("inbox", {"agent": "d", "wait": 30})
            await wait_for_waiters(bus.port, 1)
            await t.send(from_="a", to="d", body="y")
            await poller.reply_to(poll)
            assert (await t.stats())["waiters"] == 0
