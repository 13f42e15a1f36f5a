"""Reading an inbox: oldest first, reading does not consume, limit, ack
(cumulative, idempotent, by ids, counted), and the long-poll ``wait``."""

from __future__ import annotations

import trio

from .wireclients import jsonl_transport, refusal, wait_for_waiters


async def send_many(t, n, to="b", sender="a"):
    return [(await t.send(from_=sender, to=to, body=f"m{i}"))["id"] for i in range(n)]


async def ids(t, agent="b", **query):
    return [m["id"] for m in await t.inbox(agent, **query)]


async def test_oldest_first_and_reading_does_not_consume(api):
    with trio.fail_after(5):
        sent = await send_many(api, 3)
        first = await api.inbox("b")
        assert [m["id"] for m in first] == sent
        assert [m["body"] for m in first] == ["m0", "m1", "m2"]
        assert await api.inbox("b") == first  # still unread


async def test_limit_returns_the_oldest(api):
    with trio.fail_after(5):
        sent = await send_many(api, 5)
        assert await ids(api, limit=2) == sent[:2]
        assert await ids(api, limit=1) == sent[:1]
        assert await ids(api, limit=1000) == sent
        assert await ids(api) == sent  # default 100


async def test_ack_is_cumulative(api):
    with trio.fail_after(5):
        m1, m2, m3, m4 = await send_many(api, 4)
        await api.ack("b", m2)
        assert await ids(api) == [m3, m4]
        await api.ack("b", m4)
        assert await ids(api) == []


async def test_ack_twice_or_lower_is_harmless(api):
    with trio.fail_after(5):
        m1, m2, m3 = await send_many(api, 3)
        await api.ack("b", m2)
        await api.ack("b", m2)
        await api.ack("b", m1)
        assert await ids(api) == [m3]


async def test_ack_is_per_inbox(api):
    with trio.fail_after(5):
        to_b = await api.send(from_="a", to="b", body="for b")
        to_c = await api.send(from_="a", to="c", body="for c")
        await api.ack("b", to_c["id"])  # covers b's message, not c's
        assert await ids(api, "b") == []
        assert await ids(api, "c") == [to_c["id"]]
        assert to_b["id"] < to_c["id"]


async def test_ack_beyond_the_newest_does_not_swallow_later_mail(api):
    with trio.fail_after(5):
        [m1] = await send_many(api, 1)
        await api.ack("b", m1 + 1000)
        assert await ids(api) == []
        later = await send_many(api, 2)
        assert await ids(api) == later


async def test_inbox_ack_is_applied_before_reading(api):
    with trio.fail_after(5):
        m1, m2, m3 = await send_many(api, 3)
        assert await ids(api, ack=m2) == [m3]
        assert await ids(api, ack=m1) == [m3]


async def test_ack_method_counts_newly_read(bus):
    with trio.fail_after(5):
        async with jsonl_transport(bus.port) as t:
            m1, m2, m3, m4, m5 = await send_many(t, 5)
            other = (await t.send(from_="a", to="c", body="not b's"))["id"]
            assert await t.ack("b", up_to=m2) == 2
            assert await t.ack("b", up_to=m2) == 0
            assert await t.ack("b", up_to=m1) == 0
            assert await t.ack("b", ids=[m4, other, m1, 999_999]) == 1
            assert await ids(t) == [m3, m5]
            assert await t.ack("b", ids=[m3, m3]) == 1
            assert await t.ack("b", up_to=other) == 1  # m5 (other > m5)
            assert await ids(t) == []
            assert await ids(t, "c") == [other]


async def test_ack_refuses_wrong_types(bus):
    with trio.fail_after(5):
        async with jsonl_transport(bus.port) as t:
            [m1] = await send_many(t, 1)
            await refusal(t.ack("b", up_to="all"), "bad_request")
            await refusal(t.ack("b", up_to=-1), "bad_request")
            await refusal(t.ack("b", ids=m1), "bad_request")
            await refusal(t.ack("b", ids=["1"]), "bad_request")
            await refusal(t.ack("ALL", up_to=m1), "bad_request")
            assert await ids(t) == [m1]


async def test_wait_returns_when_a_message_arrives(bus, connect):
    async with connect(bus.port) as waiter, jsonl_transport(bus.port) as sender:
        with trio.fail_after(5):  # far below the 30 s the poll may wait
            got = []
            async with trio.open_nursery() as n:
                n.start_soon(_collect, got, waiter.inbox("b", wait=30))
                await wait_for_waiters(bus.port)
                r = await sender.send(from_="a", to="b", body="wake up")
            assert [m["id"] for m in got[0]] == [r["id"]]


async def test_wait_returns_on_a_broadcast(start_bus, connect):
    bus = await start_bus(agents=["b"])  # b is known: broadcasts reach it
    async with connect(bus.port) as waiter, jsonl_transport(bus.port) as sender:
        with trio.fail_after(5):
            got = []
            async with trio.open_nursery() as n:
                n.start_soon(_collect, got, waiter.inbox("b", wait=30))
                await wait_for_waiters(bus.port)
                r = await sender.send(from_="a", to="ALL", body="everyone")
            assert [(m["id"], m["to"]) for m in got[0]] == [(r["id"], "ALL")]


async def test_wait_returns_an_empty_list_on_time_out(api):
    with trio.fail_after(5):
        start = trio.current_time()
        assert await api.inbox("b", wait=1) == []
        assert trio.current_time() - start >= 0.9


async def test_wait_answers_at_once_when_mail_is_waiting(api):
    with trio.fail_after(5):  # wait=60 is in range but must not be used up
        [m1] = await send_many(api, 1)
        assert await ids(api, wait=60) == [m1]


async def test_wait_is_not_woken_by_mail_for_others(bus, connect):
    async with connect(bus.port) as waiter, jsonl_transport(bus.port) as sender:
        with trio.fail_after(5):
            got = []
            async with trio.open_nursery() as n:
                n.start_soon(_collect, got, waiter.inbox("b", wait=1))
                await wait_for_waiters(bus.port)
                await sender.send(from_="a", to="c", body="not for b")
            assert got == [[]]


async def _collect(out, aw):
    out.append(await aw)


async def test_after_skips_older_unread_and_waits_for_newer(api, bus):
    """``after`` (busd's addition for followers that don't ack): only ids
    above it, and a long-poll with it waits although older mail is unread."""
    with trio.fail_after(10):
        sent = await send_many(api, 3)
        assert await ids(api, after=sent[0]) == sent[1:]
        assert await ids(api, after=sent[-1]) == []
        async with jsonl_transport(bus.port) as other:
            async with trio.open_nursery() as n:
                got: list[int] = []

                async def follow() -> None:
                    got.extend(await ids(api, after=sent[-1], wait=5))

                n.start_soon(follow)
                await wait_for_waiters(bus.port, 1)
                newer = (await other.send(from_="c", to="b", body="new"))["id"]
            assert got == [newer]
