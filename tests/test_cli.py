"""The ``busd`` client commands as an agent runs them: child processes against
a real daemon on loopback, their exit codes checked and their ``--json``
output parsed."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import trio

from busd.client import AsyncClient

from .clientkit import Ran, busd, cli_env, free_port, refused_port, running_bus

__all__ = ["refused_port"]  # a fixture


async def test_send_inbox_ack(bus: Any, tmp_path: Any) -> None:
    env = cli_env(bus.port, tmp_path, BUSD_AGENT="manager")
    code = "    indented code stays as it is, however long the line may be"
    long_body = " ".join(f"word{i}" for i in range(60)) + "\n\n" + code
    with trio.fail_after(40):
        r = await busd("send", "coder", "Build login", "--body", long_body, "--json", env=env)
        assert r.code == 0, r.err
        first = r.json()
        assert first["id"] >= 1 and first["recipients"] == 1 and first["key"] and "queued" not in first

        r = await busd("send", "coder", "--reply-to", str(first["id"]), "--key", "k-1", env=env, stdin=b"from stdin\n")
        assert r.code == 0, r.err
        assert r.out.startswith("sent #")
        r = await busd("send", "coder", "--reply-to", str(first["id"]), "--key", "k-1", "--json", env=env, stdin=b"x")
        second = r.json()
        assert second["duplicate"] is True and second["key"] == "k-1"

        r = await busd("inbox", "coder", env=env)
        assert r.code == 0, r.err
        assert "From:     manager" in r.out and "Subject:  Build login" in r.out
        assert f"Reply-To: #{first['id']}" in r.out
        assert code in r.out
        assert all(len(line) <= 100 for line in r.out.splitlines() if line.startswith("word"))  # wrapped
        assert "2 unread messages for coder" in r.err

        r = await busd("inbox", "coder", "--json", env=env)
        msgs = r.ndjson()
        assert [(m["id"], m["from"], m["to"]) for m in msgs] == [
            (first["id"], "manager", "coder"),
            (second["id"], "manager", "coder"),
        ]
        assert msgs[0]["body"] == long_body and msgs[1]["body"] == "from stdin\n"
        assert msgs[1]["reply_to"] == first["id"] and "reply_to" not in msgs[0]

        r = await busd("inbox", "coder", "--ack", "--limit", "1", "--json", env=env)
        assert [m["id"] for m in r.ndjson()] == [first["id"]]
        r = await busd("ack", "coder", str(second["id"]), "--json", env=env)
        assert r.code == 0 and r.json() == {"agent": "coder", "up_to": second["id"], "acked": 1}
        coder = cli_env(bus.port, tmp_path, BUSD_AGENT="coder")
        r = await busd("ack", str(second["id"]), env=coder)  # AGENT from BUSD_AGENT
        assert r.code == 0 and "acked 0 messages of coder" in r.out
        r = await busd("inbox", "--wait", "0.2", env=coder)
        assert r.code == 0 and r.out == "" and "no unread messages for coder" in r.err


async def test_agents_stats_ping(bus: Any, tmp_path: Any) -> None:
    env = cli_env(bus.port, tmp_path, BUSD_AGENT="a")
    with trio.fail_after(30):
        assert (await busd("send", "b", "--body", "hi", env=env)).code == 0
        r = await busd("agents", "--json", env=env)
        assert r.code == 0 and {a["name"]: a["unread"] for a in r.ndjson()} == {"a": 0, "b": 1}
        r = await busd("agents", env=env)
        assert r.out.splitlines()[0].split() == ["NAME", "UNREAD", "LAST", "SEEN"]
        r = await busd("stats", "--json", env=env)
        stats = r.json()
        assert r.code == 0 and stats["last_id"] == 1 and stats["unread"] == 1 and "writer" in stats
        r = await busd("stats", env=env)
        assert r.code == 0 and "last id      1" in r.out
        r = await busd("ping", "--json", "--url", f"http://127.0.0.1:{bus.port}", env=env)
        assert r.code == 0 and r.json()["pong"] is True


async def test_exit_codes(start_bus: Any, tmp_path: Any, refused_port: int) -> None:
    bus = await start_bus(token="s3cret")
    env = cli_env(bus.port, tmp_path, BUSD_AGENT="a", BUSD_TOKEN="s3cret")
    with trio.fail_after(40):
        # 2: usage
        results = await _all(
            busd("send", env=env),
            busd("inbox", "--limit", "0", env=env),
            busd("send", "b", "--body", "x", env={k: v for k, v in env.items() if k != "BUSD_AGENT"}),
            busd("ping", "--url", "https://bus:1", env=env),
            busd("frobnicate", env=env),
        )
        for r in results:
            assert r.code == 2, r
        # 4: refused by the bus, the reason on stderr (and in JSON with --json)
        r = await busd("send", "b", "--body", "x", "--json", env={**env, "BUSD_TOKEN": "wrong"})
        assert r.code == 4 and "unauthorized" in r.err and r.json()["error"]["reason"] == "unauthorized"
        r = await busd("send", "not a name", "--body", "x", env=env)
        assert r.code == 4 and "bad_request" in r.err
        # 3: unreachable, with no outbox to fall back on
        down = {**env, "BUSD_URL": f"127.0.0.1:{refused_port}"}
        r = await busd("inbox", "--retry-for", "0.2", "--json", env=down)
        assert r.code == 3 and "cannot reach the bus" in r.err and r.json()["error"]["reason"] == "unavailable"
        r = await busd("send", "b", "--body", "x", "--no-outbox", "--retry-for", "0.2", env=down)
        assert r.code == 3
        # and 0 for a good one
        r = await busd("send", "b", "--body", "x", "--json", env=env)
        assert r.code == 0 and r.json()["id"] == 1


async def test_send_while_down_then_outbox_flush(tmp_path: Any, db_path: str) -> None:
    port = free_port()
    env = cli_env(port, tmp_path, BUSD_AGENT="a")
    with trio.fail_after(40):
        r = await busd("send", "b", "first", "--body", "1", "--retry-for", "0.2", env=env)
        assert r.code == 0 and r.out == "" and "queued in the outbox" in r.err
        assert str(tmp_path / "busd" / "outbox.db") in r.err  # under XDG_STATE_HOME
        r = await busd("send", "b", "second", "--body", "2", "--retry-for", "0.2", "--json", env=env)
        assert r.code == 0 and r.json()["queued"] is True and "queued in the outbox" in r.err
        r = await busd("outbox", "--json", env=env)
        assert r.code == 0 and [(e["from"], e["to"], e["subject"]) for e in r.ndjson()] == [
            ("a", "b", "first"),
            ("a", "b", "second"),
        ]
        r = await busd("outbox", env=env)
        assert "[queued]" in r.out and "a -> b 'first'" in r.out
        r = await busd("outbox", "--flush", "--retry-for", "0.2", env=env)
        assert r.code == 3 and "2 messages still queued" in r.err

        async with running_bus(db_path, port=port):
            r = await busd("outbox", "--flush", "--json", env=env)
            assert r.code == 0, r.err
            report = r.json()
            assert len(report["delivered"]) == 2 and report["remaining"] == 0 and report["reached"] is True
            r = await busd("inbox", "b", "--json", env=env)
            assert [m["subject"] for m in r.ndjson()] == ["first", "second"]
        r = await busd("outbox", env=env)
        assert r.code == 0 and r.out == "" and "empty" in r.err


async def test_tail_follows_until_interrupted(bus: Any, tmp_path: Any) -> None:
    env = cli_env(bus.port, tmp_path, BUSD_AGENT="coder")
    with trio.fail_after(30):
        async with AsyncClient(f"127.0.0.1:{bus.port}", agent="manager", outbox=False) as c:
            await c.send("coder", "before")
            async with _running(["tail", "--json", "--ack"], env) as tail:
                assert (await tail.next_line()).count('"body":"before"') == 1
                await c.send("coder", "during 1")
                await c.send("coder", "during 2")
                lines = [await tail.next_line(), await tail.next_line()]
                assert ['"body":"during 1"' in lines[0], '"body":"during 2"' in lines[1]] == [True, True]
                while await c.inbox("coder"):  # --ack acks what it printed, right after printing it
                    await trio.sleep(0.02)
                assert await tail.interrupt() == 0

            # without --ack: each message shown once, all left unread
            await c.send("coder", "before-2")
            async with _running(["tail"], env) as tail:
                await tail.wait_for("before-2")
                await c.send("coder", "after-2")
                await tail.wait_for("after-2")
                assert await tail.interrupt() == 0
            assert tail.text.count("before-2") == 1 and tail.text.count("after-2") == 1
            assert "From:     manager" in tail.text
            assert [m.body for m in await c.inbox("coder")] == ["before-2", "after-2"]


async def _all(*calls: Any) -> list[Ran]:
    results: list[Any] = [None] * len(calls)

    async def one(i: int, call: Any) -> None:
        results[i] = await call

    async with trio.open_nursery() as n:
        for i, call in enumerate(calls):
            n.start_soon(one, i, call)
    return results


class _Tail:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buf = b""
        self.text = ""

    async def next_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self.buf:
            chunk = await self.process.stdout.receive_some(65536)
            assert chunk, f"tail exited: {self.process.returncode}"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.text += line.decode() + "\n"
        return line.decode()

    async def wait_for(self, text: str) -> None:
        while text not in self.text:
            await self.next_line()

    async def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return await self.process.wait()


class _running:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.env = env

    async def __aenter__(self) -> _Tail:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "busd", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env,
        )
        self.tail = _Tail(process)
        return self.tail

    async def __aexit__(self, *exc: object) -> None:
        p = self.tail.process
        if p.returncode is None:
            p.kill()
        await p.wait()
        if p.stdout is not None:
            await p.stdout.aclose()
