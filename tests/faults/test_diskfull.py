"""Disk full: the database on a small tmpfs, filled up under the daemon.
Sends are refused with ``unavailable`` (never a success for what was not
written, never a crash), nothing acknowledged is lost, and once space
returns the same daemon takes sends again, without a restart.

Skipped where a tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN),
unless BUSD_FAULTS_REQUIRE_MOUNTS is set.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from ..daemon import running_daemon
from ..wireclients import HttpClient, JsonLinesClient
from ._support import DAEMON_ARGS, tmpfs, tmpfs_available

pytestmark = pytest.mark.usefixtures(tmpfs_available.__name__)

SIZE = "8m"
BIG = 16 * 1024  # body of the sends that fill the disk
RECIPIENTS = [f"r{i}" for i in range(4)]
SHORT = 2.0  # seconds the disk stays full: well inside the daemon's 10 s maintenance tick
LONG = 12.0  # longer than that tick (last-seen flush, retention sweep every 10 s)


def fill(path: Path) -> int:
    """Grow ``path`` until the file system is full; returns its size."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            block = b"\0" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return written


class Sender:
    """Direct sends from one agent, round-robin over RECIPIENTS; remembers
    what was acknowledged."""

    def __init__(self, client: JsonLinesClient) -> None:
        self.c = client
        self.n = 0
        self.acked: dict[int, tuple[str, str]] = {}  # id -> (to, body)
        self.refused: list[str] = []

    async def send(self, size: int) -> dict:
        self.n += 1
        to = RECIPIENTS[self.n % len(RECIPIENTS)]
        body = f"m{self.n}:" + "x" * size
        reply = await self.c.call("send", {"from": "s", "to": to, "body": body, "key": f"k{self.n}"})
        if "result" in reply:
            assert reply["result"]["id"] not in self.acked, reply
            self.acked[reply["result"]["id"]] = (to, body)
        else:
            self.refused.append(reply["error"]["data"]["reason"])
        return reply


async def stored(port: int) -> dict[int, tuple[str, str]]:
    out = {}
    async with JsonLinesClient(port) as c:
        for agent in RECIPIENTS:
            reply = await c.call("inbox", {"agent": agent, "limit": 1000})
            msgs = reply["result"]["messages"]
            assert len(msgs) < 1000, "more unread than one read shows: shrink the test"
            out.update({m["id"]: (m["to"], m["body"]) for m in msgs})
    return out


def missing(acked: dict[int, tuple[str, str]], found: dict[int, tuple[str, str]]) -> list[int]:
    return [i for i, msg in acked.items() if found.get(i) != msg]


async def test_disk_full_refuses_sends_keeps_acked_and_recovers(tmp_path):
    await disk_full(tmp_path, SHORT)


async def test_disk_full_longer_than_the_maintenance_tick(tmp_path):
    await disk_full(tmp_path, LONG)


async def disk_full(tmp_path: Path, full_for: float) -> None:
    with tmpfs(tmp_path / "small", SIZE) as disk, trio.fail_after(60 + full_for):
        db = str(disk / "bus.db")
        filler = disk / "filler"
        async with running_daemon(db, *DAEMON_ARGS) as d:
            async with JsonLinesClient(d.port) as c:
                s = Sender(c)
                for _ in range(40):
                    assert "result" in await s.send(100)
                fill(filler)
                # fill the last pages (the WAL's, the database's) until a send is refused
                for _ in range(2000):
                    if "error" in await s.send(BIG):
                        break
                assert s.refused, f"{len(s.acked)} sends acknowledged on a full disk, none refused"
                # stay full for a while: every send refused as unavailable (or, if it fits, acknowledged)
                deadline = trio.current_time() + full_for
                tries = 0
                while trio.current_time() < deadline:
                    try:
                        await s.send(BIG)
                    except AssertionError:  # the wire client's "connection closed"
                        raise AssertionError(f"busd went away while the disk was full:\n{d.stderr_text()}") from None
                    tries += 1
                    await trio.sleep(0.25)
                assert set(s.refused) == {"unavailable"}, s.refused
                assert d.process.returncode is None, f"busd died while the disk was full:\n{d.stderr_text()}"
                async with HttpClient(d.port) as h:
                    resp = await h.post_json("/api/send", {"from": "s", "to": "r0", "body": "x" * BIG})
                    assert resp.status == 503 and resp.json()["error"]["code"] == "unavailable", (resp.status, resp.body)
                    assert (await h.get("/healthz")).status == 200
                refused_while_full = len(s.refused)
                # space returns: the same daemon takes sends again, on its own
                os.unlink(filler)
                deadline = trio.current_time() + 5
                while "error" in await s.send(100):
                    assert trio.current_time() < deadline, f"still refusing 5 s after space returned: {s.refused[-3:]}"
                    await trio.sleep(0.1)
                recovered_after = len(s.refused) - refused_while_full
                for _ in range(30):
                    reply = await s.send(1000)
                    assert "result" in reply, reply
                found = await stored(d.port)
                assert not missing(s.acked, found), f"acknowledged sends not in the inbox: {missing(s.acked, found)[:10]}"
            d.kill()
            await d.wait()
        # and a crash after all that loses nothing either
        async with running_daemon(db, *DAEMON_ARGS) as d:
            found = await stored(d.port)
            assert not missing(s.acked, found), f"lost after kill -9: {missing(s.acked, found)[:10]}"
            assert len(found) == len(s.acked), "a refused send was stored"
        print(
            f"disk full: {len(s.acked)} acked, {refused_while_full} refused while full ({tries} tries held "
            f"{full_for:.0f} s), {recovered_after} refused after space returned"
        )
