"""The offline outbox: the file itself, and end to end with a real daemon that
is down, then up: sends queued by an agent process that then crashes are
delivered by its next run exactly once and in order; new sends go behind
queued ones; refusals that are final are kept aside, not retried."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest
import trio

from busd import outbox as outbox_mod
from busd.client import AsyncClient, Backoff, BusClientError, Client
from busd.outbox import Outbox
from busd.wire import SendParams

from .clientkit import cli_env, free_port, in_thread, python, running_bus

DOWN = Backoff(initial=0.02, maximum=0.1, total=0.2)  # give up on a dead bus quickly


def params(sender: str, to: str, body: str, key: str) -> SendParams:
    return SendParams(from_=sender, to=to, body=body, key=key)


# ---- the file ---------------------------------------------------------------


def test_the_file_keeps_order_keys_and_failures(tmp_path: Any) -> None:
    path = tmp_path / "state" / "outbox.db"
    box = Outbox(path)
    assert box.pending("bus:1") == [] and box.senders("bus:1") == set() and box.entries() == []
    assert not path.exists()  # reading creates nothing

    first = box.put("bus:1", params("a", "b", "one", "k1"))
    box.put("bus:2", params("a", "b", "elsewhere", "k1"))
    box.put("bus:1", params("c", "b", "two", "k2"))
    assert box.put("bus:1", params("a", "b", "one", "k1")) == first  # same key: one row
    box.put("bus:1", params("a", "ALL", "three", "k3"))
    box.close()

    box = Outbox(path)  # a new process, same file
    assert [(e.from_, e.body, e.key) for e in box.pending("bus:1")] == [
        ("a", "one", "k1"),
        ("c", "two", "k2"),
        ("a", "three", "k3"),
    ]
    assert box.senders("bus:1") == {"a", "c"}
    box.remove(first)
    box.fail(box.pending("bus:1")[0].seq, "too_large: body is over 100 bytes")
    assert [e.body for e in box.pending("bus:1")] == ["three"]
    failed = [e for e in box.entries() if e.error]
    assert [(e.body, e.error) for e in failed] == [("two", "too_large: body is over 100 bytes")]
    assert box.pending("bus:1")[0].params == params("a", "ALL", "three", "k3")
    box.close()
    assert path.stat().st_size > 0


def test_default_path_follows_xdg(monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.delenv("BUSD_OUTBOX", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert outbox_mod.default_path() == str(tmp_path / "busd" / "outbox.db")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert outbox_mod.default_path() == str(tmp_path / "home" / ".local" / "state" / "busd" / "outbox.db")
    monkeypatch.setenv("BUSD_OUTBOX", str(tmp_path / "x.db"))
    assert outbox_mod.default_path() == str(tmp_path / "x.db")


# ---- end to end -------------------------------------------------------------

AGENT_QUEUES_THEN_CRASHES = """
import json, os
from busd.client import Backoff, Client
c = Client(agent="planner", retry=Backoff(initial=0.02, maximum=0.1, total=0.2))
sent = [c.send("coder", f"step {i}", subject=f"#{i}") for i in (1, 2, 3)]
print(json.dumps([{"key": s.key, "queued": s.queued} for s in sent]), flush=True)
os._exit(17)  # crash: no close, no clean-up
"""

AGENT_RESTARTS = """
import json
from busd.client import Client
c = Client(agent="planner")
c.ping()  # the next contact with the bus delivers what is queued
print(json.dumps(len(c.queued())))
"""


async def test_queued_by_a_crashed_agent_delivered_once_in_order_after_restart(tmp_path: Any, db_path: str) -> None:
    port = free_port()
    box = str(tmp_path / "outbox.db")
    env = cli_env(port, tmp_path, BUSD_OUTBOX=box)
    with trio.fail_after(30):
        # the daemon is down: the agent queues three sends, then dies
        crashed = await python(AGENT_QUEUES_THEN_CRASHES, env=env)
        assert crashed.returncode == 17, crashed.stderr
        sent = json.loads(crashed.stdout)
        assert [s["queued"] for s in sent] == [True, True, True]
        keys = [s["key"] for s in sent]
        assert len(set(keys)) == 3
        assert [e.key for e in Outbox(box).pending(f"127.0.0.1:{port}")] == keys

        # a copy of the outbox as it was: as if a flush crashed after the bus
        # stored everything but before the file forgot it
        copy = str(tmp_path / "copy.db")
        with sqlite3.connect(box) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)

        async with running_bus(db_path, port=port):
            restarted = await python(AGENT_RESTARTS, env=env)
            assert restarted.returncode == 0, restarted.stderr
            assert json.loads(restarted.stdout) == 0  # nothing left

            with Client(f"127.0.0.1:{port}", outbox=copy) as c:
                again = await in_thread(c.flush)
            assert [s.key for s in again.delivered] == keys
            assert all(s.duplicate for s in again.delivered) and again.remaining == 0

            async with AsyncClient(f"127.0.0.1:{port}", outbox=False) as reader:
                msgs = await reader.inbox("coder")
        assert [(m.from_, m.subject, m.body) for m in msgs] == [
            ("planner", "#1", "step 1"),
            ("planner", "#2", "step 2"),
            ("planner", "#3", "step 3"),
        ]
        assert msgs[0].id < msgs[1].id < msgs[2].id


async def test_new_sends_go_behind_queued_ones(tmp_path: Any, db_path: str) -> None:
    port = free_port()
    url = f"127.0.0.1:{port}"
    with trio.fail_after(20):
        async with AsyncClient(url, agent="a", outbox=tmp_path / "o.db", retry=DOWN) as c:
            assert (await c.send("b", "1")).queued
            start = time.monotonic()
            assert (await c.send("b", "2")).queued
            assert time.monotonic() - start < DOWN.total  # one try, no backoff: it waits behind "1" anyway
            async with running_bus(db_path, port=port):
                third = await c.send("b", "3")
                assert not third.queued and third.id is not None
                assert await c.queued() == []
                assert [m.body for m in await c.inbox("b")] == ["1", "2", "3"]


async def test_any_call_that_reaches_the_bus_delivers_the_queue(tmp_path: Any, db_path: str) -> None:
    port = free_port()
    with trio.fail_after(20):
        with Client(f"127.0.0.1:{port}", agent="a", outbox=tmp_path / "o.db", retry=DOWN) as c:
            for body in ("x", "y"):
                assert (await in_thread(c.send, "b", body)).queued
            async with running_bus(db_path, port=port):
                assert (await in_thread(c.ping)).pong
                assert await in_thread(c.queued) == []
                assert [m.body for m in await in_thread(c.inbox, "b")] == ["x", "y"]


async def test_a_refusal_for_now_is_queued_and_delivered_later(start_bus: Any, tmp_path: Any) -> None:
    bus = await start_bus(inbox_cap=1)
    url = f"127.0.0.1:{bus.port}"
    with trio.fail_after(15):
        async with AsyncClient(url, agent="a", outbox=tmp_path / "o.db") as c:
            first = await c.send("b", "fits")
            held = await c.send("b", "waits")  # inbox_full: refused for now
            assert held.queued and held.id is None
            report = await c.flush()
            assert (report.delivered, report.remaining, report.reached) == ([], 1, True)
            await c.ack(first.id, agent="b")  # b reads its mail: room again
            report = await c.flush()
            assert [s.key for s in report.delivered] == [held.key] and report.remaining == 0
            assert [m.body for m in await c.inbox("b")] == ["waits"]


async def test_final_refusals_at_flush_are_kept_aside(tmp_path: Any, db_path: str) -> None:
    port = free_port()
    box = tmp_path / "o.db"
    with trio.fail_after(20):
        async with AsyncClient(f"127.0.0.1:{port}", agent="a", outbox=box, retry=DOWN) as c:
            too_big = await c.send("b", "x" * 500)
            fine = await c.send("b", "small")
            assert too_big.queued and fine.queued
            async with running_bus(db_path, port=port, max_body=100):
                report = await c.flush()
                assert [e.key for e in report.failed] == [too_big.key]
                assert report.failed[0].error is not None and report.failed[0].error.startswith("too_large")
                assert [s.key for s in report.delivered] == [fine.key] and report.remaining == 0
                assert (await c.flush()).delivered == []  # not tried again
                assert [m.body for m in await c.inbox("b")] == ["small"]
        kept = Outbox(box).entries()
        assert [(e.key, e.error is not None) for e in kept] == [(too_big.key, True)]


async def test_a_shared_outbox_leaves_other_agents_messages_to_them(tmp_path: Any, db_path: str) -> None:
    """Per-agent tokens: agent a cannot deliver b's queued messages (forbidden);
    they stay, in order, for b's own client."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a a\ntok-b b\ntok-admin *\n")
    port = free_port()
    url = f"127.0.0.1:{port}"
    box = tmp_path / "shared.db"
    with trio.fail_after(20):
        a = AsyncClient(url, token="tok-a", agent="a", outbox=box, retry=DOWN)
        b = AsyncClient(url, token="tok-b", agent="b", outbox=box, retry=DOWN)
        assert (await b.send("c", "b1")).queued
        assert (await a.send("c", "a1")).queued
        assert (await b.send("c", "b2")).queued
        async with running_bus(db_path, port=port, tokens_file=str(tokens)):
            report = await a.flush()
            assert len(report.delivered) == 1 and report.failed == [] and report.remaining == 2
            assert (await a.send("c", "a2")).queued is False  # a has nothing queued: straight through
            report = await b.flush()
            assert len(report.delivered) == 2 and report.remaining == 0
            async with AsyncClient(url, token="tok-admin", outbox=False) as reader:
                bodies = [m.body for m in await reader.inbox("c")]
        assert bodies == ["a1", "a2", "b1", "b2"]
        await a.aclose()
        await b.aclose()


async def test_a_wrong_token_at_flush_leaves_the_queue_alone(tmp_path: Any, db_path: str) -> None:
    port = free_port()
    url = f"127.0.0.1:{port}"
    box = tmp_path / "o.db"
    with trio.fail_after(20):
        async with AsyncClient(url, token="wrong", agent="a", outbox=box, retry=DOWN) as c:
            assert (await c.send("b", "kept")).queued
            with pytest.raises(BusClientError) as e:
                await c.send("b", "x" * (1024 * 1024))  # refused at once, even offline: never queued
            assert e.value.reason == "too_large"
            async with running_bus(db_path, port=port, token="right"):
                with pytest.raises(BusClientError) as e:
                    await c.flush()
                assert e.value.reason == "unauthorized"
                assert [(x.body, x.error) for x in Outbox(box).entries()] == [("kept", None)]
                with Client(url, token="right", outbox=box) as good:
                    report = await in_thread(good.flush)
                assert len(report.delivered) == 1 and report.remaining == 0
