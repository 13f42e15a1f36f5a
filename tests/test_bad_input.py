"""Misbehaving clients. After each abuse a Witness proves, on fresh
connections over both transports, that the bus still serves and that no
acknowledged message was lost."""

from __future__ import annotations

import json
import random

import pytest
import trio

from .wireclients import (
    JsonLinesClient,
    Witness,
    exchange_raw,
    http_request_bytes,
    jsonl_transport,
    parse_http_responses,
    pipelined_sends,
    read_until_eof,
    refusal,
    wait_for_waiters,
)


@pytest.fixture
async def witness(bus):
    return await Witness(bus.port).plant()


async def inbox_bodies(port, agent="b"):
    async with jsonl_transport(port) as t:
        return [m["body"] for m in await t.inbox(agent, limit=1000)]


@pytest.mark.parametrize(
    "body",
    [b"{nope", b"", b"[1]", b'"x"', b"null", b'{"from":"a","to":"b","body":"x"', b'{"from":"a","to":\xff}'],
)
async def test_http_send_with_invalid_json_is_bad_request(bus, witness, body):
    with trio.fail_after(5):
        [resp] = parse_http_responses(await exchange_raw(bus.port, http_request_bytes("POST", "/api/send", body)))
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
        await witness.check()
        assert await inbox_bodies(bus.port) == []


async def test_http_invalid_utf8_in_a_string_is_bad_request(bus, witness):
    body = b'{"from":"a","to":"b","body":"\xff"}'
    with trio.fail_after(5):
        [resp] = parse_http_responses(await exchange_raw(bus.port, http_request_bytes("POST", "/api/send", body)))
        assert resp.status == 400 and resp.json()["error"]["code"] == "bad_request"
        await witness.check()


@pytest.mark.parametrize(
    "line", [b'{"id":1,"method":"\xff"}', b'{"id":1,"method":"send","params":{"from":"a","to":"b","body":"\xff"}}']
)
async def test_jsonl_invalid_utf8_in_a_string_is_answered(bus, witness, line):
    """The bad line gets an error reply; the connection, and what is in
    flight on it, carry on."""
    with trio.fail_after(5):
        async with JsonLinesClient(bus.port) as c:
            poll = await c.request("inbox", {"agent": "b", "wait": 30})
            await c.send_raw(line + b"\n")
            reply = await c.read_reply()
            assert reply["error"]["code"] in (-32700, -32602) and reply["error"]["data"]["reason"] == "bad_request"
            assert (await c.call("ping"))["result"]["pong"] is True
            async with jsonl_transport(bus.port) as other:
                sent = await other.send(from_="a", to="b", body="for the poll")
            assert [m["id"] for m in (await c.reply_to(poll))["result"]["messages"]] == [sent["id"]]
        await witness.check()


async def test_wrong_types_are_bad_request(api, witness):
    wrong = [
        {"from": None},
        {"from": ["a"]},
        {"to": 5},
        {"to": ["b", "c"]},
        {"to": None},
        {"subject": {"text": "s"}},
        {"reply_to": "1"},
        {"reply_to": 1.5},
        {"key": ["k"]},
        {"body": 3.14},
    ]
    with trio.fail_after(10):
        for fields in wrong:
            await refusal(api.send(**{"from": "a", "to": "b", "body": "x", **fields}), "bad_request")
        for query in ({"limit": "many"}, {"wait": "later"}, {"ack": "all"}, {"limit": 2.5}):
            await refusal(api.inbox("b", **query), "bad_request")
        await witness.check()
        assert await api.inbox("b") == []


@pytest.mark.parametrize("opening", [b"\xff", b"{", b" ", b"G"], ids=["binary", "brace", "space", "G"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_random_bytes(bus, witness, opening, seed):
    junk = opening + random.Random(seed).randbytes(20_000)
    with trio.fail_after(10):
        await exchange_raw(bus.port, junk)  # whatever it answers, it must close
        await witness.check()


@pytest.mark.parametrize(
    "garbage",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost localhost\r\n\r\n",
        b"GET\r\n\r\n",
        b"POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
        b"POST /api/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000,  # a head that never ends
    ],
    ids=["not-http", "bad-header", "no-target", "bad-length", "bad-chunk", "endless-head"],
)
async def test_garbage_http_gets_a_4xx_and_a_close(bus, witness, garbage):
    with trio.fail_after(5):
        replies = parse_http_responses(await exchange_raw(bus.port, garbage))
        assert len(replies) == 1 and 400 <= replies[0].status < 500
        assert replies[0].json()["ok"] is False
        await witness.check()


@pytest.mark.parametrize(
    "partial",
    [
        b"POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"from":"a","to":"b","body":',
        b"POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Len",
        b"POST /api/se",
    ],
    ids=["short-body", "in-headers", "in-request-line"],
)
async def test_half_sent_http_request_then_disconnect(bus, witness, partial):
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", bus.port)
        await stream.send_all(partial)
        await stream.aclose()
        await witness.check()
        assert await inbox_bodies(bus.port) == []


async def test_http_body_over_the_limit_is_413(bus, witness):
    head = b"POST /api/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n"
    with trio.fail_after(5):
        [resp] = parse_http_responses(await exchange_raw(bus.port, head))
        assert resp.status == 413 and resp.json()["error"]["code"] == "too_large"
        await witness.check()


async def test_http_body_over_the_limit_sent_in_full_is_413(bus, witness):
    """A plain client writes headers and body in one go; it must still
    read the 413 (the bus must not reset the connection under it)."""
    body = json.dumps({"from": "a", "to": "b", "body": "x" * 2_000_000}).encode()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", bus.port)
        async with stream, trio.open_nursery() as n:

            async def write():
                try:
                    await stream.send_all(http_request_bytes("POST", "/api/send", body))
                except trio.BrokenResourceError:
                    pass

            n.start_soon(write)
            answer = await read_until_eof(stream)
        [resp] = parse_http_responses(answer)
        assert resp.status == 413 and resp.json()["error"]["code"] == "too_large"
        await witness.check()
        assert await inbox_bodies(bus.port) == []


@pytest.mark.parametrize("how", ["jsonl", "http"])
async def test_client_vanishes_mid_long_poll(bus, witness, how):
    poll = (
        b'{"id":1,"method":"inbox","params":{"agent":"b","wait":30}}\n'
        if how == "jsonl"
        else http_request_bytes("GET", "/api/inbox/b?wait=30")
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", bus.port)
        await stream.send_all(poll)
        await wait_for_waiters(bus.port)
        await trio.aclose_forcefully(stream)
        async with jsonl_transport(bus.port) as t:
            sent = await t.send(from_="a", to="b", body="for whoever polls next")
            assert [m["id"] for m in await t.inbox("b")] == [sent["id"]]
        await witness.check()


async def test_client_vanishes_with_pipelined_sends_unanswered(bus, witness):
    """Whatever of a pipeline got committed is a prefix of what was written."""
    with trio.fail_after(10):
        async with JsonLinesClient(bus.port) as c:
            await c.send_raw(pipelined_sends(["b"] * 100))
        await witness.check()
        bodies = await inbox_bodies(bus.port)
        assert bodies == [str(i) for i in range(len(bodies))]


async def test_unterminated_json_line_then_disconnect(bus, witness):
    with trio.fail_after(5):
        async with JsonLinesClient(bus.port) as c:
            await c.send_raw(b'{"id":1,"method":"send","params":{"from":"a","to":"b","body":"half')
        await witness.check()
        assert await inbox_bodies(bus.port) == []


async def test_flood_of_bad_lines_without_reading(bus, witness):
    """A client that writes errors faster than it reads replies must not
    wedge the bus for anyone else."""
    with trio.fail_after(10):
        async with JsonLinesClient(bus.port) as c:
            await c.send_raw(b"{nope}\n" * 5000)
            await witness.check()
