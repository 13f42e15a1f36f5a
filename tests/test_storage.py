"""What the contract says about the database: WAL with synchronous=FULL,
messages outlive the daemon, and a database failure is reported as
``unavailable``. (``kill -9`` durability is test_crash.py; retention is
test_retention.py.)"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from functools import partial

import trio

from busd import app

from .conftest import make_config
from .wireclients import jsonl_transport, refusal

FULL = 2  # PRAGMA synchronous


async def test_database_is_wal_with_full_sync(bus, db_path):
    with trio.fail_after(5):
        async with jsonl_transport(bus.port) as t:
            await t.send(from_="a", to="b", body="x")
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    writer = bus.bus.store._writer.conn  # synchronous is per connection: ask the writer's own
    assert writer.execute("PRAGMA synchronous").fetchone()[0] == FULL


async def test_messages_and_read_marks_outlive_the_daemon(bus_session):
    with trio.fail_after(10):
        async with bus_session() as ep, jsonl_transport(ep.port) as t:
            sent = [(await t.send(from_="a", to="b", body=str(i), key=f"k{i}"))["id"] for i in range(3)]
            await t.ack("b", sent[0])
        async with bus_session() as ep, jsonl_transport(ep.port) as t:
            assert [m["id"] for m in await t.inbox("b")] == sent[1:]
            again = await t.send(from_="a", to="b", body="0", key="k0")
            assert again["duplicate"] is True and again["id"] == sent[0]
            newer = await t.send(from_="a", to="b", body="after restart")
            assert newer["id"] > sent[-1]


async def test_database_failure_is_unavailable(start_bus, connect, db_path):
    """The database file vanishes under the daemon (deleted, volume gone):
    reads fail, and the client is told ``unavailable`` (HTTP 503)."""
    ep = await start_bus()
    with trio.fail_after(5):
        async with connect(ep.port) as t:
            os.rename(db_path, db_path + ".gone")
            await refusal(t.inbox("b"), "unavailable")


async def test_run_stops_cleanly_when_stop_is_set(db_path, bus_session):
    stop = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            ep = await n.start(partial(app.run, make_config(db_path, {}), stop=stop))
            async with jsonl_transport(ep.port) as t:
                sent = await t.send(from_="a", to="b", body="before the stop")
            stop.set()  # app.run must return by itself: the nursery then exits
        async with bus_session() as ep, jsonl_transport(ep.port) as t:
            assert [m["id"] for m in await t.inbox("b")] == [sent["id"]]
