"""Broadcast: ``to: "ALL"`` puts one message (one id, ``to == "ALL"``) in the
inbox of every known agent except the sender. Known: has sent, has read its
inbox, or is configured; a name that was only sent to is not."""

from __future__ import annotations

import trio


async def test_broadcast_reaches_every_known_agent_but_the_sender(start_bus, connect):
    ep = await start_bus(agents=["configured"])
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            await t.inbox("reader")  # known by reading
            await t.send(from_="talker", to="boss", body="hello")  # known by sending
            await t.send(from_="boss", to="ghost", body="only sent to")  # ghost: not known
            r = await t.send(from_="boss", to="ALL", subject="news", body="all hands")
            assert r["recipients"] == 3
            for agent in ("configured", "reader", "talker"):
                copies = [m for m in await t.inbox(agent) if m["to"] == "ALL"]
                assert copies == [
                    {
                        "id": r["id"],
                        "from": "boss",
                        "to": "ALL",
                        "subject": "news",
                        "body": "all hands",
                        "timestamp": r["timestamp"],
                    }
                ], agent
            assert [m["to"] for m in await t.inbox("boss")] == ["boss"]  # talker's, not its own broadcast
            assert [m["body"] for m in await t.inbox("ghost")] == ["only sent to"]


async def test_broadcast_with_nobody_else_known_reaches_nobody(api):
    with trio.fail_after(5):
        r = await api.send(from_="alone", to="ALL", body="anyone?")
        assert r["recipients"] == 0
        assert await api.inbox("alone") == []


async def test_a_new_agent_gets_only_later_broadcasts(api):
    with trio.fail_after(5):
        await api.inbox("early")
        before = await api.send(from_="boss", to="ALL", body="before")
        await api.inbox("late")
        after = await api.send(from_="boss", to="ALL", body="after")
        assert [m["id"] for m in await api.inbox("early")] == [before["id"], after["id"]]
        assert [m["id"] for m in await api.inbox("late")] == [after["id"]]


async def test_each_copy_is_acked_in_its_own_inbox(api):
    with trio.fail_after(5):
        await api.inbox("b")
        await api.inbox("c")
        r = await api.send(from_="a", to="ALL", body="x")
        await api.ack("b", r["id"])
        assert await api.inbox("b") == []
        assert [m["id"] for m in await api.inbox("c")] == [r["id"]]


async def test_broadcast_with_key_is_stored_once(api):
    with trio.fail_after(5):
        await api.inbox("b")
        first = await api.send(from_="a", to="ALL", body="once", key="bk")
        again = await api.send(from_="a", to="ALL", body="once", key="bk")
        assert again["duplicate"] is True
        assert (again["id"], again["timestamp"]) == (first["id"], first["timestamp"])
        assert [m["id"] for m in await api.inbox("b")] == [first["id"]]
