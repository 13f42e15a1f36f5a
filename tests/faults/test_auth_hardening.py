"""Auth hardening: per-agent tokens cannot read or ack another inbox or send
as another name, over either transport; token comparison goes through
hmac.compare_digest against every configured token; tokens never show in
the daemon's logs (in process at DEBUG, and a child's stderr at DEBUG), in
error replies, or in configuration errors.

Real daemon, real loopback sockets, real SQLite file. Tokens are random per
test so that a match in a log can only be a leak.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from typing import Any, Self

import pytest
import trio

import busd.config
from busd.config import ConfigError, Tokens, read_tokens_file

from ._abuse_support import (
    ROOT,
    LineReader,
    check_http_replies,
    connect,
    http_request,
    http_roundtrip,
    read_until_closed,
    spawn_daemon,
)

TRANSPORTS = ["jsonl", "http"]


def _tokens() -> dict[str, str]:
    return {name: f"{name}-{secrets.token_hex(12)}" for name in ("alice", "bob", "admin", "shared")}


def _tokens_file(tmp_path: Any, t: dict[str, str]) -> str:
    path = tmp_path / "tokens"
    path.write_text(f"# agents\n{t['alice']} alice\n{t['bob']} bob\n{t['admin']} *\n")
    return str(path)


class Client:
    """One connection of either transport, keeping every byte it received
    (so a test can look for tokens in replies). ``call`` answers
    (ok, result-or-error-reason, reply)."""

    def __init__(self, kind: str, port: int, token: str | None) -> None:
        self.kind = kind
        self.port = port
        self.token = token
        self.received = bytearray()
        self.n = 0

    async def __aenter__(self) -> Self:
        self.stream = await connect(self.port)
        self.lines = LineReader(self.stream)
        self.hbuf = bytearray()
        if self.kind == "jsonl" and self.token is not None:
            await self.auth(self.token)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def auth(self, token: Any) -> tuple[bool, Any]:
        if self.kind == "http":
            self.token = token
            return True, None
        return await self._rpc("auth", {"token": token})

    async def _rpc(self, method: str, params: dict[str, Any] | None = None) -> tuple[bool, Any]:
        self.n += 1
        msg: dict[str, Any] = {"id": self.n, "method": method}
        if params is not None:
            msg["params"] = params
        await self.stream.send_all(json.dumps(msg).encode() + b"\n")
        line = await self.lines.line()
        self.received += line + b"\n"
        reply = json.loads(line)
        assert reply["id"] == self.n
        if "error" in reply:
            return False, reply["error"]["data"]["reason"]
        return True, reply["result"]

    async def _http(self, method: str, target: str, body: Any = None) -> tuple[bool, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        raw = json.dumps(body).encode() if body is not None else None
        status, hdrs, payload = await http_roundtrip(self.stream, self.hbuf, http_request(method, target, raw, headers))
        self.received += payload + json.dumps(hdrs).encode()
        obj = json.loads(payload)
        if status != 200:
            assert obj["ok"] is False
            return False, obj["error"]["code"]
        return True, obj

    async def send(self, **fields: Any) -> tuple[bool, Any]:
        if self.kind == "jsonl":
            return await self._rpc("send", fields)
        return await self._http("POST", "/api/send", fields)

    async def inbox(self, agent: str, **query: Any) -> tuple[bool, Any]:
        if self.kind == "jsonl":
            ok, result = await self._rpc("inbox", {"agent": agent, **query})
            return ok, result["messages"] if ok else result
        target = f"/api/inbox/{agent}" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
        ok, result = await self._http("GET", target)
        return ok, result["messages"] if ok else result

    async def ack(self, agent: str, **params: Any) -> tuple[bool, Any]:
        assert self.kind == "jsonl"  # HTTP acks only through inbox?ack=
        return await self._rpc("ack", {"agent": agent, **params})


def _rows(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# ---- per-agent tokens -------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_agent_token_cannot_act_as_another_agent(kind: str, start_bus: Any, tmp_path: Any, db_path: str) -> None:
    t = _tokens()
    bus = await start_bus(tokens_file=_tokens_file(tmp_path, t))
    async with Client("jsonl", bus.port, t["admin"]) as admin:
        bob_ids = []
        for i in range(3):
            ok, r = await admin.send(**{"from": "carol", "to": "bob", "body": f"for bob {i}"})
            assert ok, r
            bob_ids.append(r["id"])
        ok, r = await admin.send(**{"from": "carol", "to": "alice", "body": "for alice"})
        assert ok, r
    refusals: list[tuple[str, Any]] = []
    async with Client(kind, bus.port, t["alice"]) as alice:
        # acting as bob, in every way the transport offers
        attempts: list[tuple[str, Any]] = [
            ("send as bob", alice.send(**{"from": "bob", "to": "alice", "body": "forged"})),
            ("broadcast as bob", alice.send(**{"from": "bob", "to": "ALL", "body": "forged"})),
            ("send as Bob", alice.send(**{"from": "Bob", "to": "alice", "body": "forged"})),
            ("read bob", alice.inbox("bob")),
            ("read bob with ack", alice.inbox("bob", ack=max(bob_ids))),
            ("read bob, long-poll", alice.inbox("bob", wait=5)),
        ]
        if kind == "jsonl":
            attempts += [
                ("ack bob up_to", alice.ack("bob", up_to=max(bob_ids))),
                ("ack bob ids", alice.ack("bob", ids=bob_ids)),
            ]
        for what, call in attempts:
            t0 = time.perf_counter()
            ok, reason = await call
            refusals.append((what, reason))
            assert not ok and reason == "forbidden", (what, reason)
            assert time.perf_counter() - t0 < 1.0, what  # refused at once, not after a wait
        # what alice may do
        ok, msgs = await alice.inbox("alice")
        assert ok and [m["body"] for m in msgs] == ["for alice"]
        ok, r = await alice.send(**{"from": "alice", "to": "bob", "body": "hi bob"})
        assert ok, r
        if kind == "jsonl":  # her own inbox, with the ids of bob's messages: nothing of bob's is touched
            ok, r = await alice.ack("alice", ids=bob_ids)
            assert ok and r == {"acked": 0}, r
    async with Client(kind, bus.port, t["bob"]) as bob:
        ok, msgs = await bob.inbox("bob")
        assert ok
        assert [m["body"] for m in msgs] == ["for bob 0", "for bob 1", "for bob 2", "hi bob"]
        assert [m["from"] for m in msgs] == ["carol"] * 3 + ["alice"]
        ok, reason = await bob.inbox("alice")
        assert not ok and reason == "forbidden"
    assert _rows(db_path, "SELECT count(*) FROM messages WHERE sender IN ('bob', 'Bob')") == [(0,)]
    assert _rows(db_path, "SELECT count(*) FROM inbox WHERE agent = 'bob' AND read_at IS NOT NULL") == [(0,)]
    print(f"[per-agent tokens {kind}] refused: {refusals}")


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_requests_without_a_valid_token_are_refused(
    kind: str, start_bus: Any, tmp_path: Any, db_path: str
) -> None:
    t = _tokens()
    bus = await start_bus(tokens_file=_tokens_file(tmp_path, t), token=t["shared"])
    near_misses = [
        None,
        "",
        " ",
        t["alice"][:-1],
        t["alice"] + "x",
        t["alice"].upper(),
        t["shared"][1:],
        "x" * 10_000,
        "🔑" + t["admin"],
    ]
    if kind == "jsonl":  # (HTTP trims the whitespace around a bearer token, as it may)
        near_misses += [" " + t["alice"], t["alice"] + "\n", t["alice"] + "\u00a0"]
    for token in near_misses:
        async with Client(kind, bus.port, None) as c:
            if token is not None:
                ok, reason = await c.auth(token)
                if kind == "jsonl":
                    assert not ok and reason == "unauthorized", (token, reason)
            for call in (c.send(**{"from": "alice", "to": "bob", "body": "x"}), c.inbox("alice")):
                ok, reason = await call
                assert not ok and reason == "unauthorized", (token, reason)
            if kind == "jsonl":
                for method in ("agents", "stats", "ping"):
                    ok, reason = await c._rpc(method)
                    assert not ok and reason == "unauthorized", (token, method)
                ok, reason = await c.ack("alice", up_to=1)
                assert not ok and reason == "unauthorized"
            else:  # other schemes are not a bearer token
                for header in (f"Basic {t['admin']}", f"Token {t['admin']}", t["admin"]):
                    req = http_request("GET", "/api/inbox/alice", headers={"Authorization": header})
                    status, _, _ = await http_roundtrip(c.stream, c.hbuf, req)
                    assert status == 401, header
                status, _, body = await http_roundtrip(c.stream, c.hbuf, http_request("GET", "/healthz"))
                assert status == 200 and json.loads(body)["ok"] is True
    if kind == "jsonl":
        # a failed auth later on does not change who a connection is
        async with Client("jsonl", bus.port, t["alice"]) as c:
            ok, reason = await c.auth(t["admin"] + "x")
            assert not ok and reason == "unauthorized"
            ok, reason = await c.inbox("bob")
            assert not ok and reason == "forbidden"
            ok, _ = await c.inbox("alice")
            assert ok
            ok, _ = await c.auth(t["bob"])  # a real token switches identity
            assert ok
            ok, _ = await c.inbox("bob")
            assert ok
    assert _rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


# ---- constant-time comparison ---------------------------------------------------------


class CompareRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes]] = []
        self._real = hmac.compare_digest

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return self._real(a, b)


async def test_tokens_are_compared_with_compare_digest_against_every_token(
    start_bus: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    recorder = CompareRecorder()
    monkeypatch.setattr(busd.config.hmac, "compare_digest", recorder)
    per_agent = {f"tok-{i}-{secrets.token_hex(8)}": f"agent{i}" for i in range(6)}
    shared = f"shared-{secrets.token_hex(8)}"
    tokens = Tokens(shared, per_agent)
    known = sorted([k.encode() for k in per_agent] + [shared.encode()])
    first, *_, last = list(per_agent)
    cases = [
        (first, "agent0"),
        (last, "agent5"),
        (shared, busd.config.ADMIN),
        ("nope", None),
        (None, None),
        ("", None),
        (first[:-1], None),
        (first + "x", None),
        ("ü" * 3, None),
    ]
    for given, expected in cases:
        recorder.calls.clear()
        assert tokens.identify(given) == expected, given
        # one comparison per configured token, whatever matched and where: no early exit
        assert sorted(b for _, b in recorder.calls) == known, given
        assert all(isinstance(a, bytes) and a == (given or "").encode() for a, _ in recorder.calls)

    # and the daemon's own auth goes through it, on both transports
    t = _tokens()
    bus = await start_bus(tokens_file=_tokens_file(tmp_path, t), token=t["shared"])
    n_tokens = 4  # alice, bob, admin, shared
    for kind in TRANSPORTS:
        for token, ok_expected in ((t["bob"], True), (t["bob"] + "!", False)):
            async with Client(kind, bus.port, None) as c:
                recorder.calls.clear()
                await c.auth(token)
                ok, _ = await c.inbox("bob")
                assert ok is ok_expected, (kind, token)
                compared = [b for a, b in recorder.calls if a == token.encode()]
                assert len(compared) == n_tokens, (kind, len(compared))
                assert len(set(compared)) == n_tokens


# ---- tokens never leak -----------------------------------------------------------------


def _assert_absent(secrets_: list[str], where: str, text: str | bytes) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for s in secrets_:
        assert s not in text, f"token {s[:8]}... appears in {where}"
        assert json.dumps(s)[1:-1] not in text, f"token {s[:8]}... (JSON-escaped) appears in {where}"


async def _auth_traffic(port: int, t: dict[str, str]) -> tuple[bytes, list[str]]:
    """Successful, failed, forbidden and malformed auth over both transports;
    every reply byte, and the wrong tokens that were tried."""
    wrong = [t["alice"][:-1] + "Z", t["admin"].upper(), "nope-" + secrets.token_hex(12), t["bob"] + "-extra"]
    received = bytearray()
    for kind in TRANSPORTS:
        for token in [t["alice"], t["admin"], t["shared"], *wrong]:
            async with Client(kind, port, None) as c:
                await c.auth(token)
                await c.send(**{"from": "alice", "to": "bob", "body": "x"})
                await c.inbox("bob")
                await c.inbox("alice", wait=0)
                received += c.received
    # malformed auth requests, one connection each (a bad one may close it)
    malformed = [
        b'{"id":1,"method":"auth","params":{"token":' + json.dumps(t["alice"]).encode() + b",}}\n",  # bad JSON
        b'{"id":1,"method":"auth","params":{"tokn":' + json.dumps(t["alice"]).encode() + b"}}\n",  # wrong field
        b'{"id":1,"method":"auth","params":[' + json.dumps(t["alice"]).encode() + b"]}\n",  # wrong type
        b'{"id":1,"method":"auth","params":{"token":1},"x":' + json.dumps(t["bob"]).encode() + b"}\n",
        b'{"id":1,"method":"auth","params":{"token":"' + t["alice"].encode() + b'\xff"}}\n',  # invalid UTF-8
        b'{"id":1,"method":"auth","params":{"token":"'
        + t["alice"].encode()
        + b'"}}'
        + b" " * 1_100_000
        + b"\n",  # too long
        b"GET /api/inbox/alice HTTP/1.1\r\nAuthorization: Bearer " + t["alice"].encode() + b"x\r\n\r\n",  # no Host
        b"GET /api/inbox/alice HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer " + t["alice"].encode() + b"\x01\r\n\r\n",
        b"GET /api/inbox/alice HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer "
        + t["alice"].encode()
        + b"\r\nContent-Length: x\r\n\r\n",
    ]
    for raw in malformed:
        s = await connect(port)
        try:
            try:
                await s.send_all(raw)
                await s.send_eof()
            except trio.BrokenResourceError:
                pass
            data, _ = await read_until_closed(s, timeout=5)
            received += data
        finally:
            await s.aclose()
    return bytes(received), wrong


async def test_tokens_never_appear_in_logs_or_replies(start_bus: Any, tmp_path: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    t = _tokens()
    bus = await start_bus(tokens_file=_tokens_file(tmp_path, t), token=t["shared"])
    received, wrong = await _auth_traffic(bus.port, t)
    everything = list(t.values()) + wrong
    assert len(received) > 2000  # the traffic did happen
    assert caplog.records  # and the daemon did log (at DEBUG)
    _assert_absent(everything, "the daemon's replies", received)
    log_text = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {logging.Formatter().formatException(r.exc_info) if r.exc_info else ''}"
        for r in caplog.records
    )
    _assert_absent(everything, "the daemon's log", log_text)
    print(
        f"[tokens in logs] records={len(caplog.records)} reply_bytes={len(received)} tokens_checked={len(everything)}"
    )


async def test_a_malformed_authorization_line_is_not_echoed(start_bus: Any, tmp_path: Any) -> None:
    """Found: h11's error text quotes the offending header line, and the 400
    body carried it, token and all."""
    t = _tokens()
    bus = await start_bus(tokens_file=_tokens_file(tmp_path, t))
    leaked = []
    lines = (
        b"Authorization Bearer %s",  # no colon
        b"Authorization : Bearer %s",  # space before the colon
        b" Authorization: Bearer %s",  # folded into the line before
        b"Authorization: Bearer %s\x00",  # a NUL in the value
        b"Authorization: Bearer %s\r\nContent-Length: %s",  # and a bad header after it
    )
    statuses = []
    for line in lines:
        s = await connect(bus.port)
        try:
            secret = t["alice"].encode()
            raw = b"GET /api/inbox/alice HTTP/1.1\r\nHost: b\r\n" + line.replace(b"%s", secret) + b"\r\n\r\n"
            await s.send_all(raw)
            await s.send_eof()
            data, _ = await read_until_closed(s, timeout=5)
        finally:
            await s.aclose()
        statuses.append(data[9:12].decode())
        assert check_http_replies(data)[-1] in (400, 401), data[:200]
        if t["alice"].encode() in data:
            leaked.append(data.split(b"\r\n\r\n", 1)[-1])
    print(f"[malformed authorization] statuses={statuses} echoed={leaked}")
    assert not leaked


async def test_tokens_never_appear_in_a_child_daemons_stderr(tmp_path: Any) -> None:
    t = _tokens()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env["BUSD_TOKEN"] = t["shared"]
    async with spawn_daemon(
        str(tmp_path / "bus.db"), "--tokens-file", _tokens_file(tmp_path, t), "--log-level", "DEBUG", env=env
    ) as d:
        received, wrong = await _auth_traffic(d.port, t)
        code = await d.stop()
    stderr = d.stderr_text()
    assert code == 0, stderr[-2000:]
    assert "DEBUG" in stderr and "auth shared token + per-agent tokens" in stderr
    everything = list(t.values()) + wrong
    _assert_absent(everything, "the daemon's stderr", stderr)
    _assert_absent(everything, "the daemon's replies", received)
    print(f"[tokens in stderr] lines={len(d.lines)} reply_bytes={len(received)}")


async def test_tokens_file_errors_do_not_echo_tokens(tmp_path: Any) -> None:
    secret = f"s3cret-{secrets.token_hex(12)}"
    bad_lines = [
        f"{secret} alice extra",
        f"{secret}",
        f"{secret} ALL",
        f"{secret} bad!name",
        f"{secret} -x",
    ]
    messages = []
    for i, line in enumerate(bad_lines):
        path = tmp_path / f"tokens{i}"
        path.write_text(f"# fine\nok-token alice\n{line}\n")
        with pytest.raises(ConfigError) as err:
            read_tokens_file(str(path))
        messages.append(str(err.value))
        assert secret not in str(err.value)
        assert f"tokens{i}:3" in str(err.value)  # it names the line instead
        # and as a user sees it: the CLI's one line on stderr
        with trio.fail_after(20):
            done = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "busd",
                    "serve",
                    "--db",
                    str(tmp_path / "x.db"),
                    "--port",
                    "0",
                    "--tokens-file",
                    str(path),
                ],
                cwd=str(ROOT),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        assert done.returncode != 0
        assert secret.encode() not in done.stderr + done.stdout, done.stderr
    print(f"[tokens-file errors] {messages}")
