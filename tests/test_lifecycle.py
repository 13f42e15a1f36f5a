"""The daemon's life as an operator sees it: start-up (options, config file,
token from the environment, the first log line), refusing to start on a bad
setting or an unusable database (without touching the file), and stopping
on SIGTERM or SIGINT with every in-flight request answered and every
acknowledged write committed.

Every daemon here is a real child process (tests/daemon.py) on a real SQLite
file, talked to over loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from .daemon import (
    DaemonExited,
    Exited,
    busd_command,
    child_env,
    refused_start,
    run_to_exit,
    running_daemon,
)
from .wireclients import HttpClient, JsonLinesClient

NO_LIMITS = ("--direct-per-minute", "0", "--broadcast-per-minute", "0")


# ---- helpers ----------------------------------------------------------------


def snapshot(path: str) -> dict[str, str | None]:
    """Hashes of a database file and its WAL/SHM companions (None: absent)."""
    out: dict[str, str | None] = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = path + suffix
        out[suffix or "db"] = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.exists(p) else None
    return out


async def make_busd_db(path: str, *messages: tuple[str, str, str]) -> None:
    """A real busd database, made by a real busd, closed cleanly."""
    async with running_daemon(path, *NO_LIMITS) as d:
        async with JsonLinesClient(d.port) as c:
            for sender, to, body in messages:
                reply = await c.call("send", {"from": sender, "to": to, "body": body})
                assert "result" in reply, reply
        assert await d.stop() == 0, d.stderr_text()


def error_line(exited: Exited) -> str:
    """The one line that says what is wrong. Before it, argparse's own usage
    block is allowed; nothing else (no traceback, no log noise)."""
    lines = exited.stderr_lines
    assert lines, "exited without saying why"
    assert "Traceback" not in exited.stderr, exited.stderr
    *before, last = lines
    if before:
        assert before[0].startswith("usage:") and all(
            ln.startswith(("usage:", " ")) for ln in before
        ), f"more than one line of error:\n{exited.stderr}"
    assert last.startswith("busd"), last
    return last


# ---- the first log line -------------------------------------------------------


async def test_first_log_line_names_address_db_and_auth(tmp_path):
    db = str(tmp_path / "bus.db")
    with trio.fail_after(30):
        async with running_daemon(db) as d:
            first = d.lines[0]
            assert first == d.listening_line, f"first log line is not the listening line: {d.lines}"
            assert f"127.0.0.1:{d.port}" in first
            assert f"db {os.path.abspath(db)};" in first
            assert "auth none" in first and "loopback" in first
            # and the port it names is the one it serves
            async with HttpClient(d.port) as h:
                resp = await h.get("/healthz")
                assert resp.status == 200 and resp.json()["ok"] is True
                # an idle keep-alive connection does not hold up a SIGTERM for long
                with trio.fail_after(10):
                    assert await d.stop(signal.SIGTERM) == 0
    assert "Traceback" not in d.stderr_text()


async def test_log_line_says_token_auth_and_never_the_token(tmp_path):
    db = str(tmp_path / "bus.db")
    secret = "s3cret-token-value-4711"
    with trio.fail_after(30):
        async with running_daemon(db, "--token", secret) as d:
            assert "auth none" not in d.listening_line
            assert "token" in d.listening_line.split("; auth ", 1)[1]
            async with JsonLinesClient(d.port) as c:
                assert "result" in await c.call("auth", {"token": secret})
                assert "result" in await c.call("send", {"from": "a", "to": "b", "body": "x"})
            assert await d.stop() == 0
    assert secret not in d.stderr_text()


# ---- bad options ----------------------------------------------------------------

BAD_OPTIONS = [
    pytest.param(["--port", "99999"], "--port", id="port-out-of-range"),
    pytest.param(["--port", "x"], "--port", id="port-not-a-number"),
    pytest.param(["--no-such-option"], "--no-such-option", id="unknown-option"),
    pytest.param(["--host", "0.0.0.0"], "--host", id="beyond-loopback-without-token"),
    pytest.param(["--retention-days", "0"], "--retention-days", id="retention-zero"),
    pytest.param(["--log-level", "LOUD"], "--log-level", id="log-level"),
    pytest.param(["--token", ""], "--token", id="empty-token"),
]


@pytest.mark.parametrize("args, option", BAD_OPTIONS)
async def test_bad_option_exits_nonzero_naming_it(tmp_path, args, option):
    db = str(tmp_path / "bus.db")
    extra = [] if "--port" in args else ["--port", "0"]
    exited = await run_to_exit(busd_command(db, *extra, *args))
    assert exited.code != 0, exited
    assert "listening" not in exited.stderr
    line = error_line(exited)
    assert option in line, f"the message does not name {option}: {line!r}"
    assert not os.path.exists(db), "a bad option still created the database"


# ---- configuration file and environment -----------------------------------------


async def test_config_file_is_honoured_and_cli_overrides_it(tmp_path):
    db = str(tmp_path / "from-config.db")
    config = tmp_path / "busd.toml"
    config.write_text(
        f'db = "{db}"\nport = 0\ntoken = "cfg-token"\ndirect-per-minute = 2\nagents = ["x", "y"]\n'
    )
    with trio.fail_after(30):
        async with running_daemon(None, "--config", str(config)) as d:
            assert f"db {db};" in d.listening_line
            assert os.path.exists(db)
            async with JsonLinesClient(d.port) as c:
                # token from the file
                refused = await c.call("send", {"from": "a", "to": "b", "body": "x"})
                assert refused["error"]["data"]["reason"] == "unauthorized", refused
                assert "result" in await c.call("auth", {"token": "cfg-token"})
                # rate limit from the file: 2 direct sends a minute
                for _ in range(2):
                    ok = await c.call("send", {"from": "a", "to": "b", "body": "x"})
                    assert "result" in ok, ok
                limited = await c.call("send", {"from": "a", "to": "b", "body": "x"})
                assert limited["error"]["data"]["reason"] == "rate_limited", limited
                # agents from the file are known: a broadcast reaches them
                bc = await c.call("send", {"from": "z", "to": "ALL", "body": "hello"})
                assert bc["result"]["recipients"] == 3, bc  # x, y and a (b has never read or sent)
                agents = {a["name"] for a in (await c.call("agents"))["result"]["agents"]}
                assert {"x", "y"} <= agents
            assert await d.stop() == 0

        assert "cfg-token" not in d.stderr_text()

        # the command line wins over the file
        async with running_daemon(None, "--config", str(config), "--direct-per-minute", "0") as d:
            async with JsonLinesClient(d.port) as c:
                await c.call("auth", {"token": "cfg-token"})
                for i in range(5):
                    ok = await c.call("send", {"from": "a", "to": "b", "body": f"again {i}"})
                    assert "result" in ok, ok
            assert await d.stop() == 0


@pytest.mark.parametrize(
    "text, named",
    [
        pytest.param('port = 0\nno-such-setting = 1\n', "no-such-setting", id="unknown-key"),
        pytest.param('port = 0\ndirect_per_minute = 1\n', "direct_per_minute", id="snake-case-key"),
        pytest.param('port = 0\n[[[ not toml\n', "busd.toml", id="not-toml"),
    ],
)
async def test_bad_config_file_is_refused(tmp_path, text, named):
    db = str(tmp_path / "bus.db")
    config = tmp_path / "busd.toml"
    config.write_text(f'db = "{db}"\n' + text)
    exited = await refused_start(None, "--config", str(config))
    assert exited.code != 0
    line = error_line(exited)
    assert named in line, f"the message does not name {named!r}: {line!r}"
    assert not os.path.exists(db), "a refused config still created the database"


async def test_missing_config_file_is_refused(tmp_path):
    missing = str(tmp_path / "nope.toml")
    exited = await refused_start(None, "--config", missing)
    assert exited.code != 0
    assert missing in error_line(exited)


async def test_busd_token_from_environment(tmp_path):
    db = str(tmp_path / "bus.db")
    token = "env-token-0815"
    with trio.fail_after(30):
        async with running_daemon(db, env=child_env({"BUSD_TOKEN": token})) as d:
            assert "auth none" not in d.listening_line
            async with JsonLinesClient(d.port) as c:
                refused = await c.call("send", {"from": "a", "to": "b", "body": "x"})
                assert refused["error"]["data"]["reason"] == "unauthorized", refused
                wrong = await c.call("auth", {"token": "not-it"})
                assert wrong["error"]["data"]["reason"] == "unauthorized", wrong
                assert "result" in await c.call("auth", {"token": token})
                assert "result" in await c.call("send", {"from": "a", "to": "b", "body": "x"})
            async with HttpClient(d.port) as h:
                assert (await h.get("/api/inbox/b")).status == 401
                h.token = token
                resp = await h.get("/api/inbox/b")
                assert resp.status == 200 and [m["body"] for m in resp.json()["messages"]] == ["x"]
            assert await d.stop() == 0
    assert token not in d.stderr_text()


# ---- stopping -------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_answers_in_flight_commits_and_exits_0(tmp_path, signum):
    """Pipelined sends on three connections, an HTTP sender and two long-polls
    are in flight when the signal comes. Every request is answered (a send:
    committed, or refused as unavailable); per connection the committed sends
    are a prefix of those written; the daemon exits 0; the database is whole
    and holds exactly the committed sends."""
    db = str(tmp_path / "bus.db")
    conns, per_conn = 3, 400
    replies: dict[int, dict[int, dict[str, Any]]] = {c: {} for c in range(conns)}
    http_ok: list[tuple[int, str]] = []
    polls: dict[str, Any] = {}

    async def pipeline(c: int, port: int, first: trio.Event) -> None:
        async with JsonLinesClient(port) as cl:
            await cl.send_raw(
                b"".join(
                    json.dumps(
                        {"id": i, "method": "send", "params": {"from": f"p{c}", "to": "sink", "body": f"p{c}#{i}"}}
                    ).encode()
                    + b"\n"
                    for i in range(1, per_conn + 1)
                )
            )
            await cl.stream.send_eof()  # all written; the daemon answers what it read, then closes
            while (line := await cl.read_line()) is not None:
                reply = json.loads(line)
                replies[c][reply["id"]] = reply
                first.set()

    async def http_sender(port: int, first: trio.Event) -> None:
        async with HttpClient(port) as h:
            for i in range(10_000):
                try:
                    resp = await h.post_json("/api/send", {"from": "hs", "to": "sink", "body": f"hs#{i}"})
                except (trio.BrokenResourceError, OSError, h11.RemoteProtocolError):
                    return
                if resp.status != 200:
                    assert resp.status in (0, 503), (resp.status, resp.body)
                    return
                http_ok.append((resp.json()["id"], f"hs#{i}"))
                first.set()

    async def jsonl_long_poll(port: int, started: trio.Event) -> None:
        async with JsonLinesClient(port) as cl:
            rid = await cl.request("inbox", {"agent": "idle1", "wait": 50})
            await cl.call("ping")  # answered only after the inbox request was read and started
            started.set()
            polls["jsonl"] = await cl.reply_to(rid)

    async def http_long_poll(port: int) -> None:
        async with HttpClient(port) as h:
            resp = await h.get("/api/inbox/idle2?wait=50")
            polls["http"] = (resp.status, resp.json())

    with trio.fail_after(40):  # well under the long-polls' 50 s
        async with running_daemon(db, *NO_LIMITS) as d:
            async with trio.open_nursery() as n:
                firsts = [trio.Event() for _ in range(conns + 1)]
                poll_started = trio.Event()
                n.start_soon(jsonl_long_poll, d.port, poll_started)
                n.start_soon(http_long_poll, d.port)
                await poll_started.wait()
                await _wait_for_waiters(d.port, 2)
                for c in range(conns):
                    n.start_soon(pipeline, c, d.port, firsts[c])
                n.start_soon(http_sender, d.port, firsts[conns])
                for ev in firsts:
                    await ev.wait()
                d.send_signal(signum)
            code = await d.wait()
    assert code == 0, d.stderr_text()
    assert "Traceback" not in d.stderr_text(), d.stderr_text()

    # the long-polls were answered at shutdown, not left to time out
    assert polls["jsonl"]["result"]["messages"] == [], polls
    assert polls["http"][0] == 200 and polls["http"][1]["messages"] == [], polls

    committed: dict[int, str] = dict(http_ok)
    refused = 0
    for c in range(conns):
        got = replies[c]
        assert sorted(got) == list(range(1, per_conn + 1)), f"conn {c}: unanswered requests"
        ok = [i for i in sorted(got) if "result" in got[i]]
        assert ok == list(range(1, len(ok) + 1)), f"conn {c}: committed sends are not a prefix: {ok}"
        for i in sorted(got):
            if "error" in got[i]:
                assert got[i]["error"]["data"]["reason"] == "unavailable", got[i]
                refused += 1
        ids = [got[i]["result"]["id"] for i in ok]
        assert ids == sorted(set(ids)), f"conn {c}: ids not increasing in write order"
        committed.update({got[i]["result"]["id"]: f"p{c}#{i}" for i in ok})
    print(f"{len(committed)} committed, {refused} refused at shutdown")

    # a clean close: WAL checkpointed and removed, the file whole, exactly the
    # committed sends in it
    assert not os.path.exists(db + "-wal"), "WAL left behind after a clean shutdown"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = dict(conn.execute("SELECT id, body FROM messages WHERE recipient = 'sink'").fetchall())
    finally:
        conn.close()
    assert stored == committed

    # and busd serves them again, in order
    with trio.fail_after(30):
        async with running_daemon(db, *NO_LIMITS) as d2:
            served = await _read_all(d2.port, "sink")
            assert await d2.stop() == 0
    assert [m["id"] for m in served] == sorted(committed)
    assert {m["id"]: m["body"] for m in served} == committed


async def _wait_for_waiters(port: int, n: int) -> None:
    """Until the daemon reports ``n`` long-polls waiting (bounded)."""
    async with JsonLinesClient(port) as c:
        for _ in range(500):
            if (await c.call("stats"))["result"]["waiters"] >= n:
                return
            await trio.sleep(0.01)
    raise AssertionError(f"never saw {n} waiting long-polls")


async def _read_all(port: int, agent: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with JsonLinesClient(port) as c:
        ack = 0
        while True:
            reply = await c.call("inbox", {"agent": agent, "ack": ack, "limit": 1000})
            msgs = reply["result"]["messages"]
            if not msgs:
                return out
            out += msgs
            ack = msgs[-1]["id"]


# ---- an unusable database ----------------------------------------------------------


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose permissions a test may take away; given back
    afterwards so that tmp_path can be cleaned up."""
    d = tmp_path / "dbdir"
    d.mkdir()
    try:
        yield d
    finally:
        for p in [d, *d.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)


async def _scenario(kind: str, base: Path) -> tuple[str, str]:
    """Set up one kind of unusable database in ``base``. Returns (db path, a
    word the error must contain)."""
    base.chmod(0o777)  # the daemon may create files here unless a case says otherwise
    db = base / "bus.db"
    if kind == "corrupt":
        db.write_bytes(os.urandom(16384))
        return str(db), "not a database"
    if kind in ("newer-schema", "newer-schema-empty"):
        conn = sqlite3.connect(db)
        if kind == "newer-schema":
            conn.execute("CREATE TABLE future (x)")
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        conn.close()
        return str(db), "newer"
    if kind == "not-busd":
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ada')")
        conn.commit()
        conn.close()
        return str(db), "not a busd database"
    if kind == "read-only-file":
        await make_busd_db(str(db), ("a", "b", "kept"))
        db.chmod(0o444)
        return str(db), "read"
    if kind == "read-only-dir":
        await make_busd_db(str(db), ("a", "b", "kept"))
        base.chmod(0o555)  # the file itself stays writable (0644)
        return str(db), "read"
    if kind == "read-only-dir-new-file":
        base.chmod(0o555)
        return str(base / "new.db"), "open"
    raise AssertionError(kind)


@dataclass
class Attempt:
    """One start-up attempt on an unusable database, looked at by three tests."""

    db: str
    word: str
    exited: Exited | None  # None: busd started (and was killed)
    started: str
    before: dict[str, str | None]
    after: dict[str, str | None]
    files_before: list[str]
    files_after: list[str]


async def _attempt(kind: str, base: Path) -> Attempt:
    with trio.fail_after(60):
        base.mkdir()
        db, word = await _scenario(kind, base)
        files_before = sorted(p.name for p in base.iterdir())
        before = snapshot(db)
        exited, started = None, ""
        try:
            # unprivileged: read-only means read-only even when the tests run as root
            async with running_daemon(db, unprivileged=True) as d:
                started = d.listening_line
        except DaemonExited as e:
            exited = e.exited
        files_after = sorted(p.name for p in base.iterdir())
        return Attempt(db, word, exited, started, before, snapshot(db), files_before, files_after)


class Attempts:
    """Start-up attempts by kind, each made once, by the first test that asks
    (three tests look at each; a daemon start is the slow part)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[str, Attempt] = {}

    def get(self, kind: str) -> Attempt:
        if kind not in self._done:
            self._done[kind] = trio.run(_attempt, kind, self.root / kind)
        return self._done[kind]


@pytest.fixture(scope="module")
def attempts(tmp_path_factory: Any) -> Iterator[Attempts]:
    root = tmp_path_factory.mktemp("unusable")
    try:
        yield Attempts(root)
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)  # so the tmp dir can be cleaned up


DB_TROUBLE = [
    "corrupt",
    "newer-schema",
    "newer-schema-empty",
    "not-busd",
    "read-only-file",
    "read-only-dir",
    "read-only-dir-new-file",
]

def _refused(a: Attempt) -> Exited:
    assert a.exited is not None, f"busd started on it: {a.started}"
    return a.exited


@pytest.mark.parametrize("kind", DB_TROUBLE)
def test_unusable_database_refused_with_clear_error(attempts, kind):
    a = attempts.get(kind)
    exited = _refused(a)
    assert exited.code != 0
    line = error_line(exited)
    assert a.word in line.lower().replace("readonly", "read-only"), f"unclear: {line!r}"


@pytest.mark.parametrize("kind", DB_TROUBLE)
def test_unusable_database_error_names_the_file(attempts, kind):
    a = attempts.get(kind)
    line = error_line(_refused(a))
    assert os.path.basename(a.db) in line, f"which database? {line!r}"


@pytest.mark.parametrize("kind", DB_TROUBLE)
def test_unusable_database_left_untouched(attempts, kind):
    """Never a silent new database, never a modified file: the file and its
    companions are exactly as they were, and nothing new appears."""
    a = attempts.get(kind)
    assert a.after == a.before
    assert a.files_after == a.files_before


_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
conn.execute("ROLLBACK")
"""


@asynccontextmanager
async def write_lock_held_by_another_process(db: str) -> AsyncIterator[None]:
    """Another process holds the database's write lock for the block. (Not
    this process: closing any descriptor of a file drops this process's
    POSIX locks on it, so merely reading the file here would release it.)"""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLD_LOCK, db], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        with trio.fail_after(20):
            got = b""
            while b"\n" not in got:
                chunk = await proc.stdout.receive_some(100)
                assert chunk, "the lock holder died"
                got += chunk
        assert got == b"locked\n"
        yield
        await proc.stdin.aclose()
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_database_write_locked_by_another_process(tmp_path):
    db = str(tmp_path / "bus.db")
    await make_busd_db(db, ("a", "b", "kept"))
    before = snapshot(db)
    async with write_lock_held_by_another_process(db):
        exited = await refused_start(db)
    assert snapshot(db) == before
    assert exited.code != 0
    line = error_line(exited)
    assert "locked" in line.lower(), line


async def test_second_daemon_on_the_same_file_is_refused(tmp_path):
    db = str(tmp_path / "bus.db")
    with trio.fail_after(60):
        async with running_daemon(db, *NO_LIMITS) as first:
            async with JsonLinesClient(first.port) as c:
                assert "result" in await c.call("send", {"from": "a", "to": "b", "body": "one"})
            exited = await refused_start(db, *NO_LIMITS)
            assert exited.code != 0
            line = error_line(exited)
            assert re.search(r"lock|in use|already|another", line, re.I), line
            # the first daemon is unharmed
            async with JsonLinesClient(first.port) as c:
                assert "result" in await c.call("send", {"from": "a", "to": "b", "body": "two"})
            assert await first.stop() == 0


async def test_read_only_file_fixed_then_starts(shared_dir):
    """The operator's view of the leftovers: busd refuses a read-only file;
    the operator makes it writable and starts busd again, which must work."""
    shared_dir.chmod(0o777)
    db = shared_dir / "bus.db"
    with trio.fail_after(60):
        await make_busd_db(str(db), ("a", "b", "kept"))
        db.chmod(0o444)
        exited = await refused_start(str(db), unprivileged=True)
        assert exited.code != 0 and "read" in error_line(exited).lower()
        db.chmod(0o644)
        async with running_daemon(str(db), unprivileged=True) as d:
            assert [m["body"] for m in await _read_all(d.port, "b")] == ["kept"]
            assert await d.stop() == 0
