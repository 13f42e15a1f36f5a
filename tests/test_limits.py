"""Rate limits (per sender token buckets, one minute's worth, 0 = off), the
inbox cap, and the configurable body limit."""

from __future__ import annotations

import math

import pytest
import trio

from .wireclients import JsonLinesClient, Refused, jsonl_transport, pipelined_sends, refusal


async def rate_limited(aw, per_minute: int):
    """``aw`` must be refused as rate_limited with an honest retry_after: > 0
    and at most the time one token takes to refill. Over HTTP the
    Retry-After header is that number in whole seconds, rounded up."""
    return check_retry_after(await refusal(aw, "rate_limited"), per_minute)


def check_retry_after(e: Refused, per_minute: int) -> Refused:
    assert e.reason == "rate_limited", e
    assert isinstance(e.retry_after, (int, float)) and 0 < e.retry_after <= 60 / per_minute + 0.1, e
    if e.transport == "http":
        assert e.data["headers"]["retry-after"] == str(math.ceil(e.retry_after)), e
    return e


async def test_broadcasts_back_to_back_up_to_the_limit(start_bus, connect):
    ep = await start_bus(broadcast_per_minute=2)
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            for _ in range(2):
                await t.send(from_="a", to="ALL", body="x")
            await rate_limited(t.send(from_="a", to="ALL", body="x"), 2)
            await t.send(from_="a", to="b", body="direct sends have their own bucket")
            await t.send(from_="c", to="ALL", body="other senders have their own bucket")


async def test_direct_sends_back_to_back_up_to_the_limit(start_bus, connect):
    ep = await start_bus(direct_per_minute=3)
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            for i in range(3):
                await t.send(from_="a", to="b", body=str(i))
            await rate_limited(t.send(from_="a", to="c", body="over"), 3)
            await t.send(from_="a", to="ALL", body="broadcasts have their own bucket")
            await t.send(from_="d", to="b", body="other senders have their own bucket")
            assert [m["body"] for m in await t.inbox("b") if m["from"] == "a"] == ["0", "1", "2"]
            assert await t.inbox("c") == []  # the refused send stored nothing


async def test_default_broadcast_limit_is_ten_a_minute(api):
    with trio.fail_after(5):
        for _ in range(10):
            await api.send(from_="a", to="ALL", body="x")
        await rate_limited(api.send(from_="a", to="ALL", body="x"), 10)


async def test_default_direct_limit_is_three_hundred_a_minute(bus):
    """Pipelined so the bucket (refilling 5 a second) barely refills."""
    with trio.fail_after(10):
        async with JsonLinesClient(bus.port) as c:
            start = trio.current_time()
            await c.send_raw(pipelined_sends(["b"] * 310))
            replies = [await c.reply_to(i) for i in range(310)]
            refilled = (trio.current_time() - start) * 5 + 1
            ok = sum("result" in r for r in replies)
            limited = [r for r in replies if "error" in r]
            assert 300 <= ok <= 300 + refilled, ok
            assert limited and all(r["error"]["data"]["reason"] == "rate_limited" for r in limited)
            assert all(r["error"]["data"]["retry_after"] > 0 for r in limited)


async def test_bucket_refills_evenly(start_bus):
    ep = await start_bus(direct_per_minute=120)  # one token every 0.5 s
    with trio.fail_after(10):
        async with jsonl_transport(ep.port) as t:
            for i in range(120):
                await t.send(from_="a", to="b", body=str(i))
            for _ in range(10):  # the time taken may have refilled a token or two
                try:
                    await t.send(from_="a", to="b", body="more")
                except Refused as refused:
                    e = check_retry_after(refused, 120)
                    break
            else:
                raise AssertionError("never rate limited")
            await trio.sleep(e.retry_after + 0.05)  # the wall clock is what refills
            await t.send(from_="a", to="b", body="after waiting as told")


async def test_zero_turns_the_limits_off(start_bus):
    ep = await start_bus(broadcast_per_minute=0, direct_per_minute=0)
    with trio.fail_after(10):
        async with JsonLinesClient(ep.port) as c:
            sends = ["ALL"] * 15 + ["b"] * 310
            await c.send_raw(pipelined_sends(sends))
            replies = [await c.reply_to(i) for i in range(len(sends))]
            assert [r for r in replies if "error" in r] == []


async def test_full_inbox_refuses_and_stores_nothing(start_bus, connect):
    ep = await start_bus(inbox_cap=3)
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            sent = [(await t.send(from_="a", to="b", body=str(i)))["id"] for i in range(3)]
            await refusal(t.send(from_="a", to="b", body="one too many"), "inbox_full")
            await refusal(t.send(from_="c", to="b", body="from anyone"), "inbox_full")
            assert [m["id"] for m in await t.inbox("b")] == sent
            await t.ack("b", sent[0])
            r = await t.send(from_="a", to="b", body="room again")
            assert [m["id"] for m in await t.inbox("b")] == sent[1:] + [r["id"]]


async def test_broadcast_to_a_full_inbox_stores_nothing_for_anyone(start_bus, connect):
    ep = await start_bus(inbox_cap=2, agents=["a", "b", "c"])
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            full = [(await t.send(from_="a", to="c", body=str(i)))["id"] for i in range(2)]
            await refusal(t.send(from_="a", to="ALL", body="x"), "inbox_full")
            assert await t.inbox("b") == []
            assert [m["id"] for m in await t.inbox("c")] == full
            await t.ack("c", full[0])
            r = await t.send(from_="a", to="ALL", body="y")
            assert r["recipients"] == 2
            assert [m["id"] for m in await t.inbox("b")] == [r["id"]]


async def test_only_recipients_inboxes_count_for_a_broadcast(start_bus, connect):
    ep = await start_bus(inbox_cap=1, agents=["a", "b"])
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            await t.send(from_="b", to="a", body="fills the sender's inbox")
            await t.send(from_="b", to="ghost", body="fills a name nobody broadcasts to")
            r = await t.send(from_="a", to="ALL", body="still fine")
            assert r["recipients"] == 1
            assert [m["id"] for m in await t.inbox("b")] == [r["id"]]


async def test_body_limit_is_configurable_and_counts_utf8_bytes(start_bus, connect):
    ep = await start_bus(max_body=100)
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            fits = ["x" * 100, "é" * 50, "€" * 33, "😀" * 25]  # 100, 100, 99, 100 bytes
            for body in fits:
                await t.send(from_="a", to="b", body=body)
            for body in ("x" * 101, "é" * 51, "€" * 34, "😀" * 26):  # all under 100 characters but the first
                await refusal(t.send(from_="a", to="b", body=body), "too_large")
            assert [m["body"] for m in await t.inbox("b")] == fits


async def test_retry_of_a_stored_send_is_answered_as_duplicate_even_when_over_the_limit(start_bus, connect):
    ep = await start_bus(broadcast_per_minute=1)
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            first = await t.send(from_="a", to="ALL", body="x", key="retry-me")
            again = await t.send(from_="a", to="ALL", body="x", key="retry-me")  # the reply was lost; retry
            assert again["duplicate"] is True and again["id"] == first["id"]
