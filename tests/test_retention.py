"""Retention: read messages older than the retention period are deleted; unread
ones never are, however old. The daemon sweeps at start-up, so each test
makes messages through a real daemon, stops it, backdates times in the
SQLite file (schema: busd/db.py), restarts it and looks at the wire and at
the tables.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Any

import trio

from busd.db import PURGE_LIMIT

from .daemon import Daemon, running_daemon
from .wireclients import JsonLinesClient

NO_LIMITS = ("--direct-per-minute", "0", "--broadcast-per-minute", "0")
SWEPT = r"retention: deleted (\d+)"


def ts(days_ago: float) -> str:
    """A busd timestamp (UTC, milliseconds, Z) ``days_ago`` days back."""
    d = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


async def call(c: JsonLinesClient, method: str, params: dict[str, Any] | None = None) -> Any:
    reply = await c.call(method, params)
    assert "result" in reply, reply
    return reply["result"]


def backdate(db: str, read_at: dict[tuple[int, str], str] = {}, sent_at: dict[int, str] = {}) -> None:
    """With the daemon stopped: set inbox.read_at for (message, agent) pairs
    and messages.ts for messages."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for (mid, agent), when in read_at.items():
            n = conn.execute(
                "UPDATE inbox SET read_at = ? WHERE message_id = ? AND agent = ? AND read_at IS NOT NULL",
                (when, mid, agent),
            ).rowcount
            assert n == 1, f"({mid}, {agent}) is not a read inbox entry"
        for mid, when in sent_at.items():
            assert conn.execute("UPDATE messages SET ts = ? WHERE id = ?", (when, mid)).rowcount == 1
        conn.execute("COMMIT")
    finally:
        conn.close()


def tables(db: str) -> tuple[dict[tuple[int, str], str | None], set[int]]:
    """(inbox rows -> read_at, message ids), read with the daemon stopped."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        inbox = {(m, a): r for m, a, r in conn.execute("SELECT message_id, agent, read_at FROM inbox")}
        messages = {m for (m,) in conn.execute("SELECT id FROM messages")}
    finally:
        conn.close()
    return inbox, messages


async def stop(d: Daemon) -> None:
    assert await d.stop() == 0, d.stderr_text()


async def test_old_read_messages_go_unread_ones_stay(tmp_path):
    db = str(tmp_path / "bus.db")
    with trio.fail_after(60):
        async with running_daemon(db, *NO_LIMITS) as d:
            async with JsonLinesClient(d.port) as c:
                for agent in ("keeper", "reader"):  # known now: broadcasts reach them
                    await call(c, "inbox", {"agent": agent})

                async def send(to: str, body: str) -> dict[str, Any]:
                    return await call(c, "send", {"from": "a", "to": to, "body": body, "key": body})

                read30 = await send("reader", "read 30 days ago")
                read8 = await send("reader", "read 8 days ago")
                read6 = await send("reader", "read 6 days ago")
                old_unread = await send("keeper", "unread, sent 30 days ago")
                new_unread = await send("keeper", "unread, recent")
                bc = await call(c, "send", {"from": "x", "to": "ALL", "body": "broadcast", "key": "bc"})
                assert bc["recipients"] == 3  # a, keeper, reader
                got = await call(c, "inbox", {"agent": "reader"})
                assert [m["id"] for m in got["messages"]] == [read30["id"], read8["id"], read6["id"], bc["id"]]
                assert (await call(c, "ack", {"agent": "reader", "up_to": bc["id"]}))["acked"] == 4
            await stop(d)

        month_ago = ts(30)
        backdate(
            db,
            read_at={
                (read30["id"], "reader"): ts(30),
                (read8["id"], "reader"): ts(8),
                (read6["id"], "reader"): ts(6),
                (bc["id"], "reader"): ts(30),
            },
            sent_at={old_unread["id"]: month_ago, bc["id"]: month_ago},
        )

        async with running_daemon(db, *NO_LIMITS) as d:
            swept = await d.wait_for_line(SWEPT)
            assert int(swept[1]) == 3, swept[0]  # read30, read8 and reader's copy of the broadcast
            async with JsonLinesClient(d.port) as c:
                # the unread ones, however old, are still served, as they were
                keeper = (await call(c, "inbox", {"agent": "keeper"}))["messages"]
                assert [(m["id"], m["body"]) for m in keeper] == [
                    (old_unread["id"], "unread, sent 30 days ago"),
                    (new_unread["id"], "unread, recent"),
                    (bc["id"], "broadcast"),
                ]
                assert keeper[0]["timestamp"] == keeper[2]["timestamp"] == month_ago
                assert keeper[1]["timestamp"] == new_unread["timestamp"]
                assert (await call(c, "inbox", {"agent": "reader"}))["messages"] == []
                a_copy = (await call(c, "inbox", {"agent": "a"}))["messages"]
                assert [m["id"] for m in a_copy] == [bc["id"]]
                # keys of messages still kept still work: same id, nothing new
                for key, sender, original in [
                    ("unread, sent 30 days ago", "a", old_unread),
                    ("read 6 days ago", "a", read6),
                    ("bc", "x", bc),
                ]:
                    again = await call(
                        c,
                        "send",
                        {"from": sender, "to": "ALL" if sender == "x" else "keeper", "body": key, "key": key},
                    )
                    assert again.get("duplicate") is True, (key, again)
                    assert again["id"] == original["id"], (key, again, original)
                keeper_after = (await call(c, "inbox", {"agent": "keeper"}))["messages"]
                assert [m["id"] for m in keeper_after] == [m["id"] for m in keeper]
            await stop(d)

    inbox, messages = tables(db)
    assert (read30["id"], "reader") not in inbox
    assert (read8["id"], "reader") not in inbox
    assert (bc["id"], "reader") not in inbox
    assert inbox.get((read6["id"], "reader")) is not None  # read, but not old enough
    assert inbox[(old_unread["id"], "keeper")] is None
    assert inbox[(new_unread["id"], "keeper")] is None
    assert inbox[(bc["id"], "keeper")] is None and inbox[(bc["id"], "a")] is None
    # a message goes when its last inbox entry goes, not before
    assert read30["id"] not in messages and read8["id"] not in messages
    assert {read6["id"], old_unread["id"], new_unread["id"], bc["id"]} <= messages


async def test_retention_days_option(tmp_path):
    """``--retention-days 1``: read two days ago goes, read twelve hours ago
    stays; unread for ten years stays."""
    db = str(tmp_path / "bus.db")
    with trio.fail_after(60):
        async with running_daemon(db, *NO_LIMITS) as d:
            async with JsonLinesClient(d.port) as c:
                two_days = await call(c, "send", {"from": "a", "to": "r", "body": "2 days"})
                half_day = await call(c, "send", {"from": "a", "to": "r", "body": "12 hours"})
                ancient = await call(c, "send", {"from": "a", "to": "s", "body": "10 years, unread"})
                await call(c, "ack", {"agent": "r", "up_to": half_day["id"]})
            await stop(d)
        backdate(
            db,
            read_at={(two_days["id"], "r"): ts(2), (half_day["id"], "r"): ts(0.5)},
            sent_at={ancient["id"]: ts(3650)},
        )
        async with running_daemon(db, *NO_LIMITS, "--retention-days", "1") as d:
            swept = await d.wait_for_line(SWEPT)
            assert int(swept[1]) == 1, swept[0]
            async with JsonLinesClient(d.port) as c:
                s = (await call(c, "inbox", {"agent": "s"}))["messages"]
                assert [(m["id"], m["body"]) for m in s] == [(ancient["id"], "10 years, unread")]
            await stop(d)
    inbox, messages = tables(db)
    assert (two_days["id"], "r") not in inbox and two_days["id"] not in messages
    assert (half_day["id"], "r") in inbox and half_day["id"] in messages
    assert inbox[(ancient["id"], "s")] is None


async def test_sweep_deletes_more_than_one_batch(tmp_path):
    """More old read entries than one retention op deletes (db.PURGE_LIMIT, a
    few thousand): the start-up sweep keeps going until all are gone, and
    leaves the unread ones."""
    db = str(tmp_path / "bus.db")
    bulk = 2 * PURGE_LIMIT + 7
    with trio.fail_after(90):
        async with running_daemon(db, *NO_LIMITS) as d:
            async with JsonLinesClient(d.port) as c:
                keep = await call(c, "send", {"from": "a", "to": "bulk", "body": "unread"})
            await stop(d)
        # Many old, read messages, written straight into the tables the way
        # busd writes them (a read entry has read_at set; unread counts only
        # unread entries, so it stays as it is).
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("BEGIN")
            old = ts(30)
            first = keep["id"] + 1
            conn.executemany(
                "INSERT INTO messages (id, sender, recipient, subject, body, reply_to, ts, key, recipients) "
                "VALUES (?, 'a', 'bulk', '', 'old', NULL, ?, NULL, 1)",
                ((i, old) for i in range(first, first + bulk)),
            )
            conn.executemany(
                "INSERT INTO inbox (message_id, agent, read_at) VALUES (?, 'bulk', ?)",
                ((i, old) for i in range(first, first + bulk)),
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        async with running_daemon(db, *NO_LIMITS) as d:
            swept = await d.wait_for_line(SWEPT, timeout=60)
            assert int(swept[1]) == bulk, swept[0]
            async with JsonLinesClient(d.port) as c:
                got = (await call(c, "inbox", {"agent": "bulk"}))["messages"]
                assert [m["id"] for m in got] == [keep["id"]]
                # ids are never reused after deletes
                later = await call(c, "send", {"from": "a", "to": "bulk", "body": "later"})
                assert later["id"] > first + bulk - 1
            await stop(d)
    inbox, messages = tables(db)
    assert set(inbox) == {(keep["id"], "bulk"), (later["id"], "bulk")}
    assert messages == {keep["id"], later["id"]}
