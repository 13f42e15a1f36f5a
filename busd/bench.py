"""``busd bench``: a load generator that drives a real daemon over the wire.

It starts the daemon itself (busd, or the Node peer for comparison) as a child
process, so it knows its pid and can read its CPU time and peak RSS from
/proc; or it drives one already running (``--url``). Load comes from several
client processes (multiprocessing), each running trio with many agent tasks,
one connection per agent, over raw sockets: JSON lines, or HTTP/1.1 requests
built by hand and parsed minimally. The clients are kept cheap because on a
small machine they, not the daemon, are likely to be the bottleneck.

Scenarios
  closed   N agents, each sending as fast as replies come (one in flight)
  open     a fixed total send rate while N agents long-poll their inboxes;
           send latency, delivery latency (send accepted -> a long-polling
           receiver has it), pulls/s
  idle     N connected agents long-polling, no traffic: server CPU and RSS
  bigdb    generate a 10M-message database (and a 10k one), then measure the
           daemon's start-up time and inbox read latency on both
  compare  busd (HTTP and JSON lines) and the Node peer (HTTP) side by side,
           several repetitions, a markdown table of medians and ratios

Every sender numbers its messages; after the load the bench reads every
inbox and checks that each acknowledged send arrived exactly once and in
per-sender order. A failed check makes the run fail (exit status 1).

Not collected by pytest; ``tests/test_bench.py`` runs it briefly as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
NODE_SRC = REPO.parent / "shared" / "peers" / "node-bus"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RECV = 65536
DEFAULT_TOKEN = "bench-token"
# Settings the bench gives a busd it starts: rate limits off and a high inbox
# cap, so the load is not refused (the Node peer has neither). Durability is
# left at its default, synchronous=FULL.
BUSD_BENCH_FLAGS = ("--direct-per-minute", "0", "--broadcast-per-minute", "0", "--inbox-cap", "10000000")


class BenchError(Exception):
    """The bench cannot go on (a daemon did not start, a worker died, ...)."""


# ---- what the clients decode -------------------------------------------------
# The bench's own minimal view of the wire (not busd.wire): it checks the
# wire as an agent sees it, and decodes only the fields it uses.


class RpcError(msgspec.Struct):
    code: int
    message: str = ""
    data: dict[str, Any] = {}


class SendResult(msgspec.Struct):
    id: int
    timestamp: str = ""
    recipients: int = 0
    duplicate: bool = False


class SendReply(msgspec.Struct):
    id: int | str | None = None
    result: SendResult | None = None
    error: RpcError | None = None


class Msg(msgspec.Struct):
    id: int
    from_: str = msgspec.field(name="from")
    body: str = ""


class InboxResult(msgspec.Struct):
    messages: list[Msg] = []


class InboxReply(msgspec.Struct):
    id: int | str | None = None
    result: InboxResult | None = None
    error: RpcError | None = None


class AnyReply(msgspec.Struct):
    id: int | str | None = None
    result: Any = None
    error: RpcError | None = None


class IdOnly(msgspec.Struct):
    id: int | str | None = None


class HttpErr(msgspec.Struct):
    code: str = ""
    message: str = ""


class HttpSendReply(msgspec.Struct):
    ok: bool
    id: int = 0
    error: HttpErr | None = None


class HttpInboxReply(msgspec.Struct):
    ok: bool
    messages: list[Msg] = []
    error: HttpErr | None = None


send_reply_dec = msgspec.json.Decoder(SendReply)
inbox_reply_dec = msgspec.json.Decoder(InboxReply)
any_reply_dec = msgspec.json.Decoder(AnyReply)
id_dec = msgspec.json.Decoder(IdOnly)
http_send_dec = msgspec.json.Decoder(HttpSendReply)
http_inbox_dec = msgspec.json.Decoder(HttpInboxReply)

# Bodies are "<seq> <padding>": names, digits and x only, so no JSON escaping.
SEND_LINE = b'{"id":%d,"method":"send","params":{"from":"%s","to":"%s","body":"%d %s"}}\n'
SEND_JSON = b'{"from":"%s","to":"%s","body":"%d %s"}'
INBOX_LINE = b'{"id":%d,"method":"inbox","params":{"agent":"%s","ack":%d,"limit":%d,"wait":%s}}\n'
HTTP_POST = b"POST /api/send HTTP/1.1\r\nHost: %s\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
HTTP_INBOX = b"GET /api/inbox/%s?ack=%d&limit=%d%s HTTP/1.1\r\nHost: %s\r\n%s\r\n"


def seq_of(body: str) -> int:
    return int(body[: body.index(" ")])


# ---- connections (inside worker processes) -----------------------------------


class JsonlConn:
    """One JSON-lines connection. ``call_direct`` when at most one request is
    in flight (no extra task); ``call`` once ``reader`` runs (many in flight,
    replies matched by id)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.rid = 0
        self.lock = trio.Lock()
        self.waiting: dict[int, list[Any]] = {}
        self.broken: BaseException | None = None

    async def read_line(self) -> bytes:
        buf = self.buf
        i = buf.find(b"\n")
        while i < 0:
            data = await self.stream.receive_some(RECV)
            if not data:
                raise ConnectionError("the server closed the connection")
            start = len(buf)
            buf += data
            i = buf.find(b"\n", start)
        self.buf = buf[i + 1 :]
        return buf[:i]

    async def call_direct(self, build: Callable[[int], bytes]) -> bytes:
        self.rid += 1
        await self.stream.send_all(build(self.rid))
        return await self.read_line()

    async def reader(self) -> None:
        try:
            while True:
                line = await self.read_line()
                slot = self.waiting.pop(id_dec.decode(line).id, None)  # type: ignore[arg-type]
                if slot is not None:
                    slot[1] = line
                    slot[0].set()
        except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.broken = e
            for slot in self.waiting.values():
                slot[0].set()
            self.waiting.clear()

    async def call(self, build: Callable[[int], bytes]) -> bytes:
        """Write under the lock (so requests go out in call order), then wait
        for the reply without holding it. ``build`` runs under the lock."""
        slot: list[Any] = [trio.Event(), None]
        async with self.lock:
            if self.broken is not None:
                raise ConnectionError(f"connection broken: {self.broken}")
            self.rid += 1
            self.waiting[self.rid] = slot
            await self.stream.send_all(build(self.rid))
        await slot[0].wait()
        if slot[1] is None:
            raise ConnectionError(f"connection broken: {self.broken}")
        return slot[1]

    async def aclose(self) -> None:
        await self.stream.aclose()


class HttpConn:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.lock = trio.Lock()

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        await self.stream.send_all(raw)
        return await self.read_response()

    async def read_response(self) -> tuple[int, bytes]:
        buf = self.buf
        i = buf.find(b"\r\n\r\n")
        while i < 0:
            data = await self.stream.receive_some(RECV)
            if not data:
                raise ConnectionError("the server closed the connection")
            buf += data
            i = buf.find(b"\r\n\r\n")
        head = buf[:i].lower()
        status = int(head[9:12])
        j = head.find(b"content-length:")
        if j < 0:
            raise BenchError(f"HTTP reply without content-length: {head[:200]!r}")
        k = head.find(b"\r\n", j)
        n = int(head[j + 15 : k if k >= 0 else len(head)])
        end = i + 4 + n
        while len(buf) < end:
            data = await self.stream.receive_some(RECV)
            if not data:
                raise ConnectionError("the server closed the connection mid-reply")
            buf += data
        self.buf = buf[end:]
        return status, buf[i + 4 : end]

    async def aclose(self) -> None:
        await self.stream.aclose()


Conn = JsonlConn | HttpConn


class Client:
    """Transport-independent calls for everything but the closed-loop hot path."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port: int = spec["port"]
        self.jsonl = spec["transport"] == "jsonl"
        self.token: str | None = spec["token"]
        self.host_hdr = f"{self.host}:{self.port}".encode()
        self.auth_hdr = b"Authorization: Bearer %s\r\n" % self.token.encode() if self.token else b""
        self.pad = b"x" * max(1, spec["body_bytes"])

    async def connect(self) -> Conn:
        stream = await trio.open_tcp_stream(self.host, self.port)
        if not self.jsonl:
            return HttpConn(stream)
        conn = JsonlConn(stream)
        if self.token:
            token = msgspec.json.encode(self.token)
            line = await conn.call_direct(
                lambda rid: b'{"id":%d,"method":"auth","params":{"token":%s}}\n' % (rid, token)
            )
            rep = any_reply_dec.decode(line)
            if rep.error is not None:
                raise BenchError(f"auth refused: {rep.error.message}")
        return conn

    async def connect_many(self, n: int, concurrency: int = 64) -> list[Conn]:
        conns: list[Conn | None] = [None] * n
        limit = trio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            async with limit:
                conns[i] = await self.connect()

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        return conns  # type: ignore[return-value]

    def http_send(self, frm: bytes, to: bytes, seq: int) -> bytes:
        body = SEND_JSON % (frm, to, seq, self.pad)
        return HTTP_POST % (self.host_hdr, self.auth_hdr, len(body)) + body

    def http_inbox(self, agent: str, ack: int, limit: int, wait: float) -> bytes:
        w = b"&wait=%d" % wait if wait else b""
        return HTTP_INBOX % (agent.encode(), ack, limit, w, self.host_hdr, self.auth_hdr)

    async def inbox(self, conn: Conn, agent: str, ack: int, limit: int, wait: float, mux: bool = False) -> list[Msg]:
        if isinstance(conn, JsonlConn):
            a = agent.encode()
            w = repr(float(wait)).encode()

            def build(rid: int) -> bytes:
                return INBOX_LINE % (rid, a, ack, limit, w)

            line = await (conn.call(build) if mux else conn.call_direct(build))
            rep = inbox_reply_dec.decode(line)
            if rep.error is not None or rep.result is None:
                raise BenchError(f"inbox {agent}: {rep.error}")
            return rep.result.messages
        status, body = await conn.request(self.http_inbox(agent, ack, limit, wait))
        hrep = http_inbox_dec.decode(body)
        if status != 200 or not hrep.ok:
            raise BenchError(f"inbox {agent}: HTTP {status} {hrep.error}")
        return hrep.messages


async def _drain(client: Client, agent: str, ack: int) -> list[tuple[str, int]]:
    """Read (and ack) everything left in ``agent``'s inbox, on a fresh connection."""
    conn = await client.connect()
    out: list[tuple[str, int]] = []
    try:
        while True:
            msgs = await client.inbox(conn, agent, ack, 1000, 0)
            if not msgs:
                return out
            out.extend((m.from_, seq_of(m.body)) for m in msgs)
            ack = msgs[-1].id
    finally:
        await conn.aclose()


async def _drain_all(client: Client, start: dict[str, int], concurrency: int = 16) -> dict[str, list[tuple[str, int]]]:
    got: dict[str, list[tuple[str, int]]] = {}
    limit = trio.CapacityLimiter(concurrency)

    async def one(agent: str, ack: int) -> None:
        async with limit:
            got[agent] = await _drain(client, agent, ack)

    async with trio.open_nursery() as nursery:
        for agent, ack in start.items():
            nursery.start_soon(one, agent, ack)
    return got


# ---- verification ------------------------------------------------------------


def verify(
    expected: Mapping[tuple[str, str], Sequence[int]], received: Mapping[str, list[tuple[str, int]]]
) -> dict[str, Any]:
    """``expected[(sender, recipient)]``: the seqs acknowledged to the sender;
    ``received[recipient]``: (sender, seq) in the order the inbox gave them.
    Every acknowledged send must arrive exactly once, in per-sender order, and
    nothing else may arrive."""
    got: dict[tuple[str, str], list[int]] = {}
    for recipient, items in received.items():
        for sender, seq in items:
            got.setdefault((sender, recipient), []).append(seq)
    missing = duplicates = out_of_order = unexpected = delivered = 0
    examples: list[str] = []
    for key in expected.keys() | got.keys():
        want = set(expected.get(key, ()))
        seen: set[int] = set()
        prev = 0
        for seq in got.get(key, ()):
            if seq in seen:
                duplicates += 1
                if len(examples) < 5:
                    examples.append(f"{key[0]}->{key[1]} #{seq} delivered twice")
                continue
            seen.add(seq)
            if seq not in want:
                unexpected += 1
                if len(examples) < 5:
                    examples.append(f"{key[0]}->{key[1]} #{seq} delivered but never acknowledged")
                continue
            delivered += 1
            if seq < prev:
                out_of_order += 1
                if len(examples) < 5:
                    examples.append(f"{key[0]}->{key[1]} #{seq} after #{prev}")
            prev = max(prev, seq)
        lost = want - seen
        missing += len(lost)
        if lost and len(examples) < 5:
            examples.append(f"{key[0]}->{key[1]} {len(lost)} acknowledged sends missing, e.g. #{min(lost)}")
    acked = sum(len(v) for v in expected.values())
    return {
        "ok": not (missing or duplicates or out_of_order or unexpected),
        "acked": acked,
        "delivered": delivered,
        "missing": missing,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "unexpected": unexpected,
        "examples": examples,
    }


def merge_verifications(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"ok": True, "examples": []}
    for p in parts:
        out["ok"] = out["ok"] and p["ok"]
        if p.get("skipped"):
            out["skipped"] = True
        for k in ("acked", "delivered", "missing", "duplicates", "out_of_order", "unexpected"):
            out[k] = out.get(k, 0) + p[k]
        out["examples"] = (out["examples"] + p["examples"])[:5]
    return out


# ---- worker processes ----------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _worker(pipe: Any, spec: dict[str, Any]) -> None:
    """Entry point of a client process: run one scenario's share, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and ends us
    _raise_nofile()
    try:
        mode = spec["mode"]
        fn = {"closed": _closed_worker, "open": _open_worker, "idle": _idle_worker}[mode]
        result = trio.run(fn, pipe, spec)
        pipe.send(("result", result))
    except BaseException as e:  # report anything; the parent decides
        try:
            pipe.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except Exception:
            pass
    finally:
        pipe.close()


async def _wait_go(pipe: Any) -> tuple[float, float | None]:
    msg = await trio.to_thread.run_sync(pipe.recv, abandon_on_cancel=True)
    if msg[0] != "go":
        raise BenchError(f"worker expected go, got {msg!r}")
    _, go, end = msg
    await trio.sleep(max(0.0, go - time.monotonic()))
    return go, end


@dataclass(slots=True)
class AgentStats:
    lat: array = field(default_factory=lambda: array("d"))
    acked: array = field(default_factory=lambda: array("q"))
    in_window: int = 0
    last: float = 0.0
    errors: Counter = field(default_factory=Counter)


async def _closed_jsonl(
    conn: JsonlConn, name: bytes, to: bytes, n_max: int, t_end: float | None, st: AgentStats, pad: bytes
) -> None:
    send_all = conn.stream.send_all
    read_line = conn.read_line
    decode = send_reply_dec.decode
    mono = time.monotonic
    lat, acked = st.lat, st.acked
    end = t_end if t_end is not None else math.inf
    seq = rid = 0
    while seq < n_max:
        t = mono()
        if t >= end:
            break
        seq += 1
        rid += 1
        await send_all(SEND_LINE % (rid, name, to, seq, pad))
        line = await read_line()
        t2 = mono()
        rep = decode(line)
        if rep.id != rid:
            raise BenchError(f"reply to request {rep.id!r} where {rid} was expected")
        if rep.result is not None:
            acked.append(seq)
            lat.append(t2 - t)
            if t2 <= end:
                st.in_window += 1
            st.last = t2
        else:
            st.errors[(rep.error.data.get("reason") if rep.error else None) or "?"] += 1


async def _closed_http(
    conn: HttpConn, client: Client, name: bytes, to: bytes, n_max: int, t_end: float | None, st: AgentStats
) -> None:
    request = conn.request
    decode = http_send_dec.decode
    build = client.http_send
    mono = time.monotonic
    lat, acked = st.lat, st.acked
    end = t_end if t_end is not None else math.inf
    seq = 0
    while seq < n_max:
        t = mono()
        if t >= end:
            break
        seq += 1
        status, body = await request(build(name, to, seq))
        t2 = mono()
        rep = decode(body)
        if status == 200 and rep.ok:
            acked.append(seq)
            lat.append(t2 - t)
            if t2 <= end:
                st.in_window += 1
            st.last = t2
        else:
            st.errors[(rep.error.code if rep.error else None) or f"http {status}"] += 1


async def _closed_worker(pipe: Any, spec: dict[str, Any]) -> dict[str, Any]:
    client = Client(spec)
    names: list[str] = spec["agents"]
    n = len(names)
    targets = [names[(k + 1) % n] for k in range(n)]  # a ring inside this worker
    counts: list[int] = spec["counts"] or [sys.maxsize] * n
    conns = await client.connect_many(n)
    pipe.send(("ready", None))
    go, t_end = await _wait_go(pipe)
    stats = [AgentStats() for _ in names]
    cpu0 = time.process_time()
    async with trio.open_nursery() as nursery:
        for k in range(n):
            a, b = names[k].encode(), targets[k].encode()
            conn = conns[k]
            if isinstance(conn, JsonlConn):
                nursery.start_soon(_closed_jsonl, conn, a, b, counts[k], t_end, stats[k], client.pad)
            else:
                nursery.start_soon(_closed_http, conn, client, a, b, counts[k], t_end, stats[k])
    cpu = time.process_time() - cpu0
    loaded = time.monotonic()
    pipe.send(("loaded", loaded))
    for c in conns:
        await c.aclose()
    expected = {(names[k], targets[k]): stats[k].acked for k in range(n)}
    if spec["verify"]:
        verification = verify(expected, await _drain_all(client, {t: 0 for t in targets}))
    else:  # the floor server stores nothing: there is nothing to check
        verification = verify({}, {}) | {"skipped": True}
    lat = array("d")
    errors: Counter = Counter()
    for st in stats:
        lat.extend(st.lat)
        errors.update(st.errors)
    return {
        "acked": sum(len(st.acked) for st in stats),
        "in_window": sum(st.in_window for st in stats),
        "last": max((st.last for st in stats), default=go),
        "go": go,
        "loaded": loaded,
        "send_lat": lat,
        "errors": dict(errors),
        "client_cpu_s": cpu,
        "verification": verification,
    }


class _Open:
    """Shared state of one open-loop worker."""

    def __init__(self, names: list[str]) -> None:
        self.next_seq: dict[str, int] = {a: 0 for a in names}
        self.acked: dict[tuple[str, str], list[int]] = {}
        self.accepted_at: dict[tuple[str, int], float] = {}
        self.written_at: dict[tuple[str, int], float] = {}
        self.received: dict[str, list[tuple[str, int]]] = {a: [] for a in names}
        self.received_at: dict[tuple[str, int], float] = {}
        self.last_id: dict[str, int] = {a: 0 for a in names}
        self.send_lat = array("d")
        self.lag = array("d")
        self.errors: Counter = Counter()
        self.pulls = 0
        self.pulls_in_window = 0
        self.in_window = 0
        self.window_end = math.inf
        self.delivered = 0
        self.n_acked = 0


async def _receiver(client: Client, conn: Conn, agent: str, st: _Open, wait: float, mux: bool) -> None:
    """An agent's long-poll loop: inbox(ack=last, wait=...) forever."""
    mono = time.monotonic
    while True:
        msgs = await client.inbox(conn, agent, st.last_id[agent], 100, wait, mux=mux)
        t = mono()
        st.pulls += 1
        if t <= st.window_end:
            st.pulls_in_window += 1
        if msgs:
            log = st.received[agent]
            for m in msgs:
                key = (m.from_, seq_of(m.body))
                log.append(key)
                st.received_at.setdefault(key, t)
            st.delivered += len(msgs)
            st.last_id[agent] = msgs[-1].id


async def _open_send(client: Client, conn: Conn, sender: str, to: str, st: _Open, scheduled: float) -> None:
    s, r = sender.encode(), to.encode()
    seq = 0
    t_write = 0.0

    def build(rid: int) -> bytes:  # runs under the connection's lock: seq order = write order
        nonlocal seq, t_write
        seq = st.next_seq[sender] = st.next_seq[sender] + 1
        t_write = time.monotonic()
        return SEND_LINE % (rid, s, r, seq, client.pad)

    if isinstance(conn, JsonlConn):
        rep = send_reply_dec.decode(await conn.call(build))
        ok = rep.result is not None
        reason = None if ok else ((rep.error.data.get("reason") if rep.error else None) or "?")
    else:
        async with conn.lock:
            seq = st.next_seq[sender] = st.next_seq[sender] + 1
            t_write = time.monotonic()
            status, body = await conn.request(client.http_send(s, r, seq))
        hrep = http_send_dec.decode(body)
        ok = status == 200 and hrep.ok
        reason = None if ok else ((hrep.error.code if hrep.error else None) or f"http {status}")
    t = time.monotonic()
    st.lag.append(t_write - scheduled)
    if not ok:
        st.errors[reason] += 1
        return
    st.acked.setdefault((sender, to), []).append(seq)
    st.accepted_at[(sender, seq)] = t
    st.written_at[(sender, seq)] = t_write
    st.send_lat.append(t - t_write)
    st.n_acked += 1
    if t <= st.window_end:
        st.in_window += 1


async def _open_worker(pipe: Any, spec: dict[str, Any]) -> dict[str, Any]:
    client = Client(spec)
    names: list[str] = spec["agents"]
    n = len(names)
    wait: float = spec["wait"]
    rate: float = spec["rate"]
    st = _Open(names)
    recv_conns = await client.connect_many(n)
    send_conns = recv_conns if client.jsonl else await client.connect_many(n)
    conn_of = dict(zip(names, send_conns, strict=True))
    rng = random.Random(spec["seed"])
    async with trio.open_nursery() as top:
        if client.jsonl:
            for c in recv_conns:
                top.start_soon(c.reader)  # type: ignore[union-attr]
        async with trio.open_nursery() as receivers:
            for a, c in zip(names, recv_conns, strict=True):
                receivers.start_soon(_receiver, client, c, a, st, wait, client.jsonl)
            pipe.send(("ready", None))
            go, t_end = await _wait_go(pipe)
            assert t_end is not None
            st.window_end = t_end
            cpu0 = time.process_time()
            async with trio.open_nursery() as senders:
                k = 0
                while rate > 0:
                    at = go + k / rate
                    if at >= t_end:
                        break
                    await trio.sleep(max(0.0, at - time.monotonic()))
                    s = rng.randrange(n)
                    r = s if n == 1 else (s + 1 + rng.randrange(n - 1)) % n
                    senders.start_soon(_open_send, client, conn_of[names[s]], names[s], names[r], st, at)
                    k += 1
            loaded = time.monotonic()
            pipe.send(("loaded", loaded))
            with trio.move_on_after(spec["settle"]):  # let the long-polls pick up the last sends
                while st.delivered < st.n_acked:
                    await trio.sleep(0.01)
            cpu = time.process_time() - cpu0
            receivers.cancel_scope.cancel()
        top.cancel_scope.cancel()
    for c in set(recv_conns) | set(send_conns):
        await c.aclose()
    leftovers = await _drain_all(client, dict(st.last_id))  # what the long-polls did not see
    late = 0
    for agent, items in leftovers.items():
        st.received[agent].extend(items)
        late += len(items)
    delivery = array("d")
    e2e = array("d")
    for key, t in st.received_at.items():
        acc = st.accepted_at.get(key)
        if acc is not None:
            delivery.append(max(0.0, t - acc))
            e2e.append(t - st.written_at[key])
    return {
        "acked": st.n_acked,
        "in_window": st.in_window,
        "go": go,
        "loaded": loaded,
        "send_lat": st.send_lat,
        "lag": st.lag,
        "delivery": delivery,
        "e2e": e2e,
        "pulls": st.pulls_in_window,
        "late": late,
        "errors": dict(st.errors),
        "client_cpu_s": cpu,
        "verification": verify(st.acked, st.received),
    }


async def _idle_worker(pipe: Any, spec: dict[str, Any]) -> dict[str, Any]:
    client = Client(spec)
    names: list[str] = spec["agents"]
    st = _Open(names)
    conns = await client.connect_many(len(names))
    async with trio.open_nursery() as top:
        if client.jsonl:
            for c in conns:
                top.start_soon(c.reader)  # type: ignore[union-attr]
        for a, c in zip(names, conns, strict=True):
            top.start_soon(_receiver, client, c, a, st, spec["wait"], client.jsonl)
        pipe.send(("ready", None))
        go, _ = await _wait_go(pipe)
        cpu0 = time.process_time()
        msg = await trio.to_thread.run_sync(pipe.recv, abandon_on_cancel=True)
        if msg[0] != "stop":
            raise BenchError(f"idle worker expected stop, got {msg!r}")
        cpu = time.process_time() - cpu0
        top.cancel_scope.cancel()
    for c in conns:
        await c.aclose()
    return {
        "pulls": st.pulls,
        "delivered": st.delivered,
        "client_cpu_s": cpu,
        "go": go,
        "verification": verify({}, st.received),
    }


# ---- daemons (in the parent) -------------------------------------------------


class Daemon:
    """A daemon the bench started: its pid, port, log tail and /proc figures."""

    def __init__(self, kind: str, proc: subprocess.Popen[bytes], started: float) -> None:
        self.kind = kind
        self.proc = proc
        self.started = started
        self.host = "127.0.0.1"
        self.port = 0
        self.startup_s = math.nan  # start -> the "listening" line
        self.ready_s = math.nan  # start -> first reply
        self.log: deque[str] = deque(maxlen=200)
        self._listening = threading.Event()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self, stream: Any, pattern: re.Pattern[str]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            if not self._listening.is_set():
                m = pattern.search(line)
                if m:
                    self.startup_s = time.monotonic() - self.started
                    self.port = int(m.group("port"))
                    self._listening.set()

    def watch(self, stream: Any, pattern: str) -> None:
        threading.Thread(target=self._pump, args=(stream, re.compile(pattern)), daemon=True).start()

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.005):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.1)
                tail = "\n".join(list(self.log)[-20:])
                self.stop()
                raise BenchError(f"{self.kind} did not start (exit status {self.proc.returncode}):\n{tail}")

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def status_kb(self, key: str) -> int:
        return proc_status_value(self.pid, key)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of every thread of ``pid``, in seconds."""
    user, system = proc_cpu_split(pid)
    return user + system


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of ``pid``, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_threads_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (threads that ended are not listed)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def proc_status_value(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (kB for the Vm* keys)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_busd(
    db: Path | str,
    token: str | None,
    extra: Sequence[str] = (),
    timeout: float = 60,
    switch_interval: float | None = None,
) -> Daemon:
    launcher = ["-m", "busd"]
    if switch_interval is not None:  # an experiment: how much of a send is waiting for the GIL?
        launcher = [
            "-c",
            f"import sys, runpy; sys.setswitchinterval({switch_interval!r}); "
            "sys.argv[0] = 'busd'; runpy.run_module('busd', run_name='__main__')",
        ]
    cmd = [sys.executable, *launcher, "serve", "--db", str(db), "--port", "0", *BUSD_BENCH_FLAGS, *extra]
    env = dict(os.environ)
    if token:
        env["BUSD_TOKEN"] = token  # not on the command line, where ps shows it
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    d = Daemon("busd", proc, t0)
    d.watch(proc.stderr, r"listening on [0-9.]+:(?P<port>\d+)")
    d.wait_listening(timeout)
    with SyncJsonl(d.host, d.port, token) as c:
        c.call("ping")
    d.ready_s = time.monotonic() - t0
    return d


def node_dir(args: argparse.Namespace) -> Path:
    """The Node peer in a writable scratch copy with its dependencies installed."""
    dest = Path(args.node_dir)
    if not (dest / "node_modules" / "better-sqlite3").is_dir():
        src = Path(args.node_src)
        if not (dest / "server.js").exists():
            if not (src / "server.js").exists():
                raise BenchError(f"no Node peer at {src} (give --node-src)")
            shutil.copytree(src, dest, dirs_exist_ok=True)
            for p in [dest, *dest.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
        print(f"bench: npm ci in {dest} ...", file=sys.stderr)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=dest, check=True, timeout=900, stdout=subprocess.DEVNULL
        )
    return dest


def start_node(ndir: Path, db: Path | str, token: str | None, timeout: float = 60) -> Daemon:
    port = free_port()
    cmd = ["node", "server.js", "--port", str(port), "--db", str(db)]
    env = dict(os.environ)
    if token:
        env["BUS_TOKEN"] = token
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ndir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    d = Daemon("node", proc, t0)
    d.watch(proc.stdout, r"node-bus on http://[0-9.]+:(?P<port>\d+)")
    d.wait_listening(timeout)
    status, _ = http_get(d.host, d.port, "/healthz")
    if status != 200:
        raise BenchError(f"node peer /healthz answered {status}")
    d.ready_s = time.monotonic() - t0
    return d


def start_floor(timeout: float = 60) -> Daemon:
    cmd = [sys.executable, "-c", "from busd.bench import floor_main; floor_main()"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    d = Daemon("floor", proc, t0)
    d.watch(proc.stderr, r"floor listening on [0-9.]+:(?P<port>\d+)")
    d.wait_listening(timeout)
    d.ready_s = time.monotonic() - t0
    return d


def floor_main() -> None:
    """The floor: a JSON-lines server made of busd's own transport pieces
    (sockio, framing, request decoding, reply encoding) with nothing behind
    them. Every request is answered at once: no bus, no writer, no SQLite, no
    durability. The closed loop against it measures what trio, the sockets
    and the wire cost on this machine, which bounds what busd's JSON lines can
    reach here."""
    from .framing import MAX_LINE, LineBuffer
    from .jsonl import _result_line, decode_request
    from .sockio import SocketIO
    from .wire import OkResult
    from .wire import SendResult as WireSendResult

    async def connection(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            io = SocketIO(stream, nursery.cancel_scope, 30.0, 0)
            nursery.start_soon(io.run_drain)
            lines = LineBuffer(MAX_LINE)
            mid = 0
            while True:
                data = io.recv_nowait()
                if data is None:
                    data = await io.recv()
                if not data:
                    break
                for line in lines.feed(data):
                    req, _ = decode_request(line)
                    mid += 1
                    result = OkResult() if req.method == "auth" else WireSendResult(mid, "2026-01-01T00:00:00.000Z", 1)
                    io.write(_result_line(req.id, result))
            nursery.cancel_scope.cancel()

    async def serve() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        print(f"floor listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        await trio.serve_listeners(connection, listeners)

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    trio.run(serve)


class SyncJsonl:
    """A blocking JSON-lines client for the parent (stats, ping, probes)."""

    def __init__(self, host: str, port: int, token: str | None, timeout: float = 60) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")
        self.rid = 0
        if token:
            self.call("auth", {"token": token})

    def __enter__(self) -> SyncJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    def call_raw(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        out = self.f.readline()
        if not out:
            raise BenchError("the daemon closed the connection")
        return out

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.rid += 1
        req: dict[str, Any] = {"id": self.rid, "method": method}
        if params is not None:
            req["params"] = params
        rep = any_reply_dec.decode(self.call_raw(msgspec.json.encode(req) + b"\n"))
        if rep.error is not None:
            raise BenchError(f"{method}: {rep.error.message}")
        return rep.result


def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head[9:12]), body


# ---- running a load scenario (parent) ----------------------------------------------


@dataclass
class Target:
    """What a run drives: a daemon the bench started, or one given by --url."""

    kind: str  # "busd" or "node"
    host: str
    port: int
    token: str | None
    daemon: Daemon | None = None

    def stats(self) -> dict[str, Any] | None:
        if self.kind != "busd":
            return None
        with SyncJsonl(self.host, self.port, self.token) as c:
            return c.call("stats")

    def cpu_s(self) -> tuple[float, float]:
        return proc_cpu_split(self.daemon.pid) if self.daemon else (math.nan, math.nan)

    def threads_cpu_s(self) -> dict[int, float]:
        return proc_threads_cpu_s(self.daemon.pid) if self.daemon else {}

    def wakeups(self) -> int:
        """Context switches of the daemon's main thread so far."""
        if not self.daemon:
            return 0
        pid = self.daemon.pid
        return proc_status_value(pid, "voluntary_ctxt_switches") + proc_status_value(pid, "nonvoluntary_ctxt_switches")

    def rss_peak_mb(self) -> float:
        return self.daemon.status_kb("VmHWM") / 1024 if self.daemon else math.nan

    def rss_mb(self) -> float:
        return self.daemon.status_kb("VmRSS") / 1024 if self.daemon else math.nan


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (seconds) in milliseconds."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] * 1000


def lat_summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "max": max(values) * 1000 if values else math.nan,
    }


def run_load(
    target: Target,
    mode: str,
    args: argparse.Namespace,
    n_agents: int,
    *,
    transport: str,
    duration: float | None = None,
    count: int | None = None,
    rate: float = 0.0,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run one scenario across worker processes; return the merged figures."""
    workers = max(1, min(args.workers, n_agents))
    run_id = f"r{os.getpid() % 1000:03d}{int(time.time() * 1000) % 100000:05d}"
    names = [f"{run_id}-{i:05d}" for i in range(n_agents)]
    shares = [names[w::workers] for w in range(workers)]
    counts: list[list[int] | None] = [None] * workers
    if count is not None:
        per = [count // n_agents + (1 if i < count % n_agents else 0) for i in range(n_agents)]
        counts = [per[w::workers] for w in range(workers)]
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    spy: subprocess.Popen[bytes] | None = None
    states: ThreadStates | None = None
    try:
        for w in range(workers):
            parent, child = ctx.Pipe()
            spec = {
                "mode": mode,
                "host": target.host,
                "port": target.port,
                "transport": transport,
                "token": target.token,
                "agents": shares[w],
                "counts": counts[w],
                "body_bytes": args.body_bytes,
                "rate": rate / workers,
                "wait": getattr(args, "wait", 30.0),
                "settle": 10.0,
                "seed": w + 1,
                "verify": target.kind != "floor",
            }
            p = ctx.Process(target=_worker, args=(child, spec), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        _expect(pipes, procs, "ready", timeout=120)
        if mode in ("idle", "open"):
            # wait until every long-poll is parked in the daemon
            deadline = time.monotonic() + 30
            while target.kind == "busd" and time.monotonic() < deadline:
                s = target.stats()
                if s and s["waiters"] >= n_agents:
                    break
                time.sleep(0.1)
            time.sleep(0.5)
        go = time.monotonic() + 0.3
        window = duration if duration is not None else (args.interval if mode == "idle" else None)
        end = go + window if window is not None else None
        for pipe in pipes:
            pipe.send(("go", go, end if mode != "idle" else None))
        time.sleep(max(0.0, go - time.monotonic()))
        cpu0, th0, wk0, t0 = target.cpu_s(), target.threads_cpu_s(), target.wakeups(), time.monotonic()
        stats0 = target.stats()
        states = ThreadStates(target.daemon.pid).start() if args_thread_states(args) and target.daemon else None
        if profile:
            spy = _start_py_spy(target, profile, window or 10.0, getattr(args, "profile_gil", False))
        if end is not None:
            time.sleep(max(0.0, end - time.monotonic()))
            cpu1, th1, wk1, t1 = target.cpu_s(), target.threads_cpu_s(), target.wakeups(), time.monotonic()
            stats1 = target.stats()
            if mode == "idle":
                for pipe in pipes:
                    pipe.send(("stop",))
            else:
                _expect(pipes, procs, "loaded", timeout=60)
        else:
            _expect(pipes, procs, "loaded", timeout=600)
            cpu1, th1, wk1, t1 = target.cpu_s(), target.threads_cpu_s(), target.wakeups(), time.monotonic()
            stats1 = target.stats()
        thread_states = states.stop() if states else None
        states = None
        rss_peak, rss_now = target.rss_peak_mb(), target.rss_mb()
        results = _expect(pipes, procs, "result", timeout=300)
        if spy is not None:
            spy.wait(60)
            spy = None
    finally:
        if states is not None:
            states.stop()
        if spy is not None and spy.poll() is None:
            spy.terminate()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    main_pid = target.daemon.pid if target.daemon else None
    main_s = th1.get(main_pid, 0.0) - th0.get(main_pid, 0.0) if main_pid else math.nan
    out: dict[str, Any] = {
        "scenario": mode,
        "target": target.kind,
        "transport": transport,
        "agents": n_agents,
        "workers": workers,
        "window_s": t1 - t0,
        "server": {
            "cpu_pct": 100 * (sum(cpu1) - sum(cpu0)) / (t1 - t0),
            "sys_pct": 100 * (cpu1[1] - cpu0[1]) / (t1 - t0),
            "main_thread_pct": 100 * main_s / (t1 - t0),
            "threads": len(th1),
            "main_thread_wakeups_per_s": (wk1 - wk0) / (t1 - t0),
            "rss_peak_mb": rss_peak,
            "rss_mb": rss_now,
            "pid": target.daemon.pid if target.daemon else None,
        },
        "client_cpu_pct": 100 * sum(r["client_cpu_s"] for r in results) / (t1 - t0),
        "verification": merge_verifications(r["verification"] for r in results),
        "errors": dict(sum((Counter(r.get("errors", {})) for r in results), Counter())),
    }
    if thread_states:
        out["thread_states"] = thread_states
    if mode in ("closed", "open"):
        acked = sum(r["acked"] for r in results)
        send_lat = [x for r in results for x in r["send_lat"]]
        if duration is not None:
            sends_per_s = sum(r["in_window"] for r in results) / duration
        else:
            span = max(r["last"] for r in results) - min(r["go"] for r in results)
            sends_per_s = acked / span if span > 0 else math.nan
        out.update({"acked": acked, "sends_per_s": sends_per_s, "send_ms": lat_summary(send_lat)})
        # CPU per send: steadier than sends/s on a machine shared with other load
        out["server"]["cpu_us_per_send"] = (
            1e6 * (sum(cpu1) - sum(cpu0)) / (sends_per_s * (t1 - t0)) if sends_per_s else math.nan
        )
    if mode == "open":
        out["rate"] = rate
        out["delivery_ms"] = lat_summary([x for r in results for x in r["delivery"]])
        out["e2e_ms"] = lat_summary([x for r in results for x in r["e2e"]])
        out["schedule_lag_ms"] = lat_summary([x for r in results for x in r["lag"]])
        out["pulls_per_s"] = sum(r["pulls"] for r in results) / (t1 - t0)
        out["late_deliveries"] = sum(r["late"] for r in results)
    if mode == "idle":
        out["pulls_in_window"] = sum(r["pulls"] for r in results)
    if stats0 and stats1:
        w0, w1 = stats0["writer"], stats1["writer"]
        batches = w1["batches"] - w0["batches"]
        ops = w1["ops"] - w0["ops"]
        out["writer"] = {
            "commits_per_s": batches / (t1 - t0),
            "mean_batch": ops / batches if batches else 0.0,
            "max_batch": w1["max_batch"],
            "commit_ms_mean": w1["commit_ms_mean"],
            "requests_per_s": (stats1["requests"] - stats0["requests"]) / (t1 - t0),
        }
        out["waiters"] = stats1["waiters"]
    return out


def args_thread_states(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "thread_states", False))


def _expect(pipes: list[Any], procs: list[Any], what: str, timeout: float) -> list[Any]:
    """One ``what`` message from every worker, in worker order."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(pipes):
        for i, pipe in enumerate(pipes):
            if i in got:
                continue
            if pipe.poll(0.01):
                try:
                    msg = pipe.recv()
                except EOFError:
                    raise BenchError(f"worker {i} exited (status {procs[i].exitcode})") from None
                if msg[0] == "error":
                    raise BenchError(f"worker {i} failed: {msg[1]}")
                if msg[0] != what:
                    raise BenchError(f"worker {i}: expected {what}, got {msg[0]}")
                got[i] = msg[1]
            elif not procs[i].is_alive() and not pipe.poll(0):
                raise BenchError(f"worker {i} exited (status {procs[i].exitcode})")
        if time.monotonic() > deadline:
            raise BenchError(f"workers did not report {what!r} within {timeout:.0f}s")
    return [got[i] for i in range(len(pipes))]


class ThreadStates:
    """An off-CPU view of the daemon: every ``interval`` seconds, the state
    (R running or runnable, S sleeping, D waiting on I/O) and kernel wait
    channel of each of its threads, from /proc, in a background thread."""

    def __init__(self, pid: int, interval: float = 0.0005) -> None:
        self.pid = pid
        self.interval = interval
        self.counts: Counter = Counter()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ThreadStates:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[str, float]]:
        self._stop.set()
        self._thread.join(5)
        n = max(1, self.rounds)
        return [(" ".join(k), 100 * v / n) for k, v in self.counts.most_common(12)]

    def _run(self) -> None:
        base = f"/proc/{self.pid}/task"
        while not self._stop.wait(self.interval):
            try:
                tids = os.listdir(base)
            except OSError:
                return
            for tid in tids:
                try:
                    with open(f"{base}/{tid}/stat") as f:
                        st = f.read()
                    with open(f"{base}/{tid}/comm") as f:
                        name = f.read().strip()
                    with open(f"{base}/{tid}/wchan") as f:
                        wchan = f.read().strip()
                except OSError:
                    continue
                who = "main" if int(tid) == self.pid else f"thread:{name.split(' from ')[0]}"
                self.counts[(who, st[st.rindex(")") + 2], wchan or "-")] += 1
            self.rounds += 1


def _py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        raise BenchError("py-spy not found (pip install py-spy)")
    return exe


def _start_py_spy(target: Target, path: str, seconds: float, gil: bool) -> subprocess.Popen[bytes]:
    if target.daemon is None or target.kind != "busd":
        raise BenchError("--profile needs a busd the bench started")
    fmt = "raw" if path.endswith(".txt") else "speedscope" if path.endswith(".json") else "flamegraph"
    cmd = [
        _py_spy(),
        "record",
        "--pid",
        str(target.daemon.pid),
        "--output",
        path,
        "--format",
        fmt,
        "--duration",
        str(max(1, int(seconds))),
        "--rate",
        "200",
        "--threads",
        "--nonblocking",
        *(["--gil"] if gil else []),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Where a sample's leaf frame is decides its component (first match wins).
COMPONENTS: list[tuple[str, str]] = [
    ("SQLite writer (db.Writer, commit)", r"busd/db\.py.*(Writer|timestamp)|Writer\."),
    ("SQLite reads (db.read_*)", r"busd/db\.py"),
    (
        "thread hop (to_thread, wake-up socketpair, outcome)",
        r"_thread_cache|_threads\.py|_wakeup_socketpair|_entry_queue|outcome/|threading\.py",
    ),
    ("socket reads and writes (busd/sockio.py, trio's socket layer)", r"busd/sockio\.py|trio/_socket\.py|trio/_highlevel_socket\.py"),
    ("timeouts and cancel scopes", r"_timeouts\.py|CancelScope|CancelStatus|Deadlines|_might_change|contextlib"),
    ("channels, events, locks", r"trio/_channel\.py|trio/_sync\.py|_parking_lot|_unbounded_queue"),
    ("trio scheduler and epoll", r"trio/_core/"),
    ("HTTP parsing (httptools)", r"httptools/"),
    ("JSON-lines transport (framing, decode, encode)", r"busd/(jsonl|framing)\.py"),
    ("HTTP transport (busd/http.py)", r"busd/http\.py"),
    ("bus logic (core, store, ratelimit, wire)", r"busd/(core|store|ratelimit|wire|serve|app)\.py"),
    ("other Python", r".*"),
]


def profile_components(path: str) -> list[tuple[str, float]]:
    """Share of samples per component, by each sample's innermost frame."""
    counts: Counter = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        leaf = stack.split(";")[-1]
        for name, pattern in COMPONENTS:
            if re.search(pattern, leaf):
                counts[name] += k
                break
    return [(name, 100 * k / total) for name, k in counts.most_common()] if total else []


def profile_summary(path: str, top: int = 25) -> str:
    """Self and inclusive shares of the busiest frames in a py-spy raw profile."""
    self_n: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        frames = [re.sub(r" \(/.*?/(busd|trio|site-packages|lib/python3[^/]*)/", r" (\1/", f) for f in stack.split(";")]
        self_n[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    if not total:
        return "(empty profile)"
    rows = [f"{total} samples", "share  component (by innermost frame)"]
    rows += [f"{share:5.1f}  {name}" for name, share in profile_components(path)]
    rows += ["self%  frame"]
    rows += [f"{100 * k / total:5.1f}  {f}" for f, k in self_n.most_common(top)]
    rows += ["incl%  frame"]
    rows += [f"{100 * k / total:5.1f}  {f}" for f, k in incl.most_common(top)]
    return "\n".join(rows)


# ---- the machine ------------------------------------------------------------------


def commit_probe(directory: Path, n: int = 100) -> dict[str, float]:
    """What one durable commit costs here right now: 1-row commits in WAL
    with synchronous=FULL (an fsync each), and rows/s of 1,000-row commits."""
    path = directory / f"probe-{os.getpid()}.db"
    try:
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("CREATE TABLE t (x)")
        t = time.perf_counter()
        for i in range(n):
            c.execute("BEGIN")
            c.execute("INSERT INTO t VALUES (?)", (i,))
            c.execute("COMMIT")
        one = (time.perf_counter() - t) / n
        rows = [(i,) for i in range(1000)]
        t = time.perf_counter()
        for _ in range(10):
            c.execute("BEGIN")
            c.executemany("INSERT INTO t VALUES (?)", rows)
            c.execute("COMMIT")
        per_s = 10_000 / (time.perf_counter() - t)
        c.close()
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return {"commit_1row_us": one * 1e6, "rows_per_s_1000row_commits": per_s}


def machine_info(args: argparse.Namespace, node: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "sqlite_python": sqlite3.sqlite_version,
        "loadavg": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    info["kernel"] = os.uname().release
    if node:
        try:
            ndir = node_dir(args)
            out = subprocess.run(
                [
                    "node",
                    "-e",
                    "const D=require('better-sqlite3');"
                    "console.log(process.version, new D(':memory:').prepare('select sqlite_version() v').get().v)",
                ],
                cwd=ndir,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
            info["node"], info["sqlite_node"] = out[0], out[1]
        except (BenchError, OSError, IndexError, subprocess.SubprocessError):
            pass
    Path(args.out).mkdir(parents=True, exist_ok=True)
    info.update(commit_probe(Path(args.out)))
    return info


def describe_machine(info: dict[str, Any]) -> str:
    la = ", ".join(f"{x:.2f}" for x in info["loadavg"])
    s = (
        f"machine: {info['cores']} cores ({info.get('cpu', '?')}), Linux {info['kernel']}, Python {info['python']} "
        f"with SQLite {info['sqlite_python']}"
    )
    if "node" in info:
        s += f"; Node {info['node']} with SQLite {info['sqlite_node']} (better-sqlite3)"
    s += (
        f"; load average {la}; a 1-row durable commit (WAL, synchronous=FULL) costs {info['commit_1row_us']:.0f} µs, "
        f"1,000-row commits reach {info['rows_per_s_1000row_commits']:,.0f} rows/s"
    )
    return s


# ---- printing ------------------------------------------------------------------


def _f(x: float, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def describe(r: dict[str, Any]) -> str:
    lines = [
        f"{r['target']} {r['scenario']} {r['transport']}: {r['agents']} agents, {r['workers']} client processes, "
        f"{r['window_s']:.1f} s measured"
    ]
    if "sends_per_s" in r:
        lines.append(
            f"  durable sends/s    {_f(r['sends_per_s'], 0)}" + (f" (offered {r['rate']:g}/s)" if r.get("rate") else "")
        )
        s = r["send_ms"]
        lines.append(f"  send latency ms    p50 {_f(s['p50'], 2)}  p99 {_f(s['p99'], 2)}  max {_f(s['max'], 2)}")
    if "delivery_ms" in r:
        d, e = r["delivery_ms"], r["e2e_ms"]
        lines.append(
            f"  delivery ms        p50 {_f(d['p50'], 2)}  p99 {_f(d['p99'], 2)}  max {_f(d['max'], 2)}"
            f"   (accepted -> long-poll has it; from write: p50 {_f(e['p50'], 2)} p99 {_f(e['p99'], 2)})"
        )
        lag = r["schedule_lag_ms"]
        lines.append(
            f"  pulls/s            {_f(r['pulls_per_s'], 0)}    client schedule lag p99 {_f(lag['p99'], 2)} ms"
        )
    if "pulls_in_window" in r:
        lines.append(
            f"  long-polls parked  {r.get('waiters', '-')}   replies during the window {r['pulls_in_window']}   "
            f"daemon main thread wakeups/s {_f(r['server']['main_thread_wakeups_per_s'], 1)}"
        )
    if "writer" in r:
        w = r["writer"]
        lines.append(
            f"  writer             commits/s {_f(w['commits_per_s'], 0)}  mean batch {_f(w['mean_batch'], 1)}  "
            f"max batch {w['max_batch']}  commit ms mean {_f(w['commit_ms_mean'], 2)}  "
            f"requests/s {_f(w['requests_per_s'], 0)}"
        )
    sv = r["server"]
    lines.append(
        f"  server             CPU {_f(sv['cpu_pct'])}% of one core ({_f(sv['sys_pct'])}% in the kernel; "
        f"main thread {_f(sv.get('main_thread_pct', math.nan))}%, {sv.get('threads', '-')} threads)  "
        f"RSS {_f(sv['rss_mb'])} MB  peak {_f(sv['rss_peak_mb'])} MB"
    )
    if "cpu_us_per_send" in sv:
        lines.append(f"  server CPU / send  {_f(sv['cpu_us_per_send'], 0)} µs")
    lines.append(f"  clients            CPU {_f(r['client_cpu_pct'])}% of one core (all processes)")
    if r.get("thread_states"):
        lines.append(
            "  daemon threads     % of samples: state (R running or runnable, S sleeping, D I/O) and wait channel"
        )
        lines += [f"    {share:5.1f}%  {what}" for what, share in r["thread_states"]]
    if r["errors"]:
        lines.append(f"  errors             {r['errors']}")
    v = r["verification"]
    if v.get("skipped"):
        lines.append("  verification       skipped: the floor server stores nothing")
    elif v["ok"] and not v["acked"]:
        lines.append("  verification       ok: no sends, nothing delivered")
    elif v["ok"]:
        lines.append(
            f"  verification       ok: {v['acked']} acknowledged sends delivered exactly once, in per-sender order"
        )
    else:
        lines.append(
            f"  verification       FAILED: {v['missing']} missing, {v['duplicates']} duplicated, "
            f"{v['out_of_order']} out of order, {v['unexpected']} unexpected of {v['acked']} acknowledged"
        )
        lines += [f"    {x}" for x in v["examples"]]
    return "\n".join(lines)


def run_ok(r: dict[str, Any]) -> bool:
    return bool(r["verification"]["ok"]) and not r["errors"]


# ---- targets and scenarios ---------------------------------------------------


class Started:
    """Context manager: a fresh daemon (and database) for one run, or --url."""

    def __init__(
        self, args: argparse.Namespace, kind: str | None = None, db: Path | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.args = args
        self.kind = kind or args.target
        self.db = db
        self.extra = extra
        self.target: Target | None = None
        self._fresh: Path | None = None

    def __enter__(self) -> Target:
        a = self.args
        if a.url:
            u = urlsplit(a.url if "//" in a.url else "//" + a.url)
            host, port = u.hostname or "127.0.0.1", u.port or 7700
            _, body = http_get(host, port, "/healthz")
            kind = "busd" if b'"busd"' in body else "node"
            self.target = Target(kind, host, port, a.token)
            return self.target
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        db = self.db
        if db is None:
            db = self._fresh = out / f"run-{self.kind}-{os.getpid()}-{time.monotonic_ns()}.db"
        token = a.token if a.token is not None else DEFAULT_TOKEN
        if self.kind == "busd":
            d = start_busd(db, token, self.extra, switch_interval=getattr(a, "switch_interval", None))
        elif self.kind == "floor":
            d = start_floor()
        else:
            d = start_node(node_dir(a), db, token)
        self.target = Target(self.kind, d.host, d.port, token, d)
        return self.target

    def __exit__(self, *exc: object) -> None:
        if self.target and self.target.daemon:
            self.target.daemon.stop()
        if self._fresh is not None and not self.args.keep_db:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self._fresh) + suffix).unlink(missing_ok=True)


def _machine_line(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info(args, node=args.target == "node")
    print(describe_machine(info))
    return info


def _repeat(args: argparse.Namespace, mode: str, **load: Any) -> int:
    """Run a load scenario ``--reps`` times, each on a fresh daemon; print
    every run, then the medians."""
    info = _machine_line(args)
    results = []
    for rep in range(args.reps):
        with Started(args) as target:
            if mode != "closed" and target.kind != "busd":
                raise BenchError(f"the {mode} scenario needs long-polls (wait), which the node peer lacks")
            profile = args.profile if rep == 0 else None
            r = run_load(target, mode, args, args.agents, transport=args.transport, profile=profile, **load)
        r["machine"] = info
        r["rep"] = rep + 1
        results.append(r)
        print(describe(r))
    if args.reps > 1:
        print(medians_line(results))
    _emit(args, results, quiet=True)
    _profile_report(args)
    return 0 if all(run_ok(r) for r in results) else 1


def medians_line(rs: list[dict[str, Any]]) -> str:
    """The headline figures of several runs of one scenario, as medians."""
    parts = [f"medians of {len(rs)} runs:"]

    def add(label: str, get: Callable[[dict[str, Any]], float], nd: int = 1) -> None:
        try:
            parts.append(f"{label} {_f(_med(rs, get), nd)}")
        except KeyError:
            pass

    add("sends/s", lambda r: r["sends_per_s"], 0)
    add("send p50 ms", lambda r: r["send_ms"]["p50"], 2)
    add("send p99 ms", lambda r: r["send_ms"]["p99"], 2)
    add("delivery p50 ms", lambda r: r["delivery_ms"]["p50"], 2)
    add("delivery p99 ms", lambda r: r["delivery_ms"]["p99"], 2)
    add("pulls/s", lambda r: r["pulls_per_s"], 0)
    add("mean batch", lambda r: r["writer"]["mean_batch"], 1)
    add("server CPU %", lambda r: r["server"]["cpu_pct"], 1)
    add("server CPU µs/send", lambda r: r["server"]["cpu_us_per_send"], 0)
    add("peak RSS MB", lambda r: r["server"]["rss_peak_mb"], 1)
    if all(r["scenario"] == "idle" for r in rs):
        add("daemon main-thread wakeups/s", lambda r: r["server"]["main_thread_wakeups_per_s"])
    parts.append("verification " + ("ok in every run" if all(run_ok(r) for r in rs) else "FAILED"))
    return "  ".join(parts)


def scenario_closed(args: argparse.Namespace) -> int:
    if args.count is None and args.duration is None:
        args.duration = 5.0
    return _repeat(args, "closed", duration=args.duration, count=args.count)


def scenario_open(args: argparse.Namespace) -> int:
    return _repeat(args, "open", duration=args.duration, rate=args.rate)


def scenario_idle(args: argparse.Namespace) -> int:
    return _repeat(args, "idle")


SYSTEMS = {
    "node-http": ("node", "http"),
    "busd-http": ("busd", "http"),
    "busd-jsonl": ("busd", "jsonl"),
    # busd's transport with nothing behind it (floor_main): the ceiling, not a contender
    "floor-jsonl": ("floor", "jsonl"),
}


def scenario_compare(args: argparse.Namespace) -> int:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            raise BenchError(f"unknown system {s!r} (choose from {', '.join(SYSTEMS)})")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    before = machine_info(args, node="node-http" in systems)
    print(describe_machine(before), file=sys.stderr)
    ok = True
    for rep in range(args.reps):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]  # rotate: no system always first
        for s in order:
            kind, transport = SYSTEMS[s]
            with Started(args, kind) as target:
                r = run_load(target, "closed", args, args.agents, transport=transport, duration=args.duration)
            r["rep"] = rep + 1
            runs[s].append(r)
            ok = ok and run_ok(r)
            print(
                f"rep {rep + 1}/{args.reps} {s}: {_f(r['sends_per_s'], 0)} sends/s, "
                f"p99 {_f(r['send_ms']['p99'], 1)} ms, verification {'ok' if run_ok(r) else 'FAILED'}",
                file=sys.stderr,
            )
    after = machine_info(args, node=False)
    table = compare_table(runs, args)
    print(describe_machine(before))
    print(
        f"after the runs: load average {', '.join(f'{x:.2f}' for x in after['loadavg'])}; 1-row durable commit "
        f"{after['commit_1row_us']:.0f} µs\n"
    )
    print(table)
    _emit(args, [r for rs in runs.values() for r in rs], quiet=True, extra={"machine": before, "machine_after": after})
    if not ok:
        for rs in runs.values():
            for r in rs:
                if not run_ok(r):
                    print(describe(r), file=sys.stderr)
    return 0 if ok else 1


def _profile_report(args: argparse.Namespace) -> None:
    if args.profile and args.profile.endswith(".txt") and os.path.exists(args.profile):
        print(profile_summary(args.profile))


def _med(rs: list[dict[str, Any]], get: Callable[[dict[str, Any]], float]) -> float:
    vals = [get(r) for r in rs]
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else math.nan


def compare_table(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    node = _med(runs.get("node-http", []), lambda r: r["sends_per_s"])
    head = (
        f"Closed loop, {args.agents} agents, {args.duration:g} s per run, {args.workers} client processes, "
        f"medians of {args.reps} runs (sends/s of every run in brackets)\n\n"
        "| system | durable sends/s | × node HTTP | send p50 ms | send p99 ms | send max ms | server CPU % | "
        "server CPU µs/send | peak RSS MB | commits/s | mean batch | client CPU % |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for s, rs in runs.items():
        if not rs:
            continue
        each = ", ".join(_f(r["sends_per_s"], 0) for r in rs)
        sps = _med(rs, lambda r: r["sends_per_s"])
        ratio = sps / node if node and not math.isnan(node) else math.nan
        cells = [
            f"{_f(sps, 0)} ({each})",
            f"{_f(ratio, 1)}×",
            _f(_med(rs, lambda r: r["send_ms"]["p50"]), 2),
            _f(_med(rs, lambda r: r["send_ms"]["p99"]), 2),
            _f(_med(rs, lambda r: r["send_ms"]["max"]), 1),
            _f(_med(rs, lambda r: r["server"]["cpu_pct"]), 0),
            _f(_med(rs, lambda r: r["server"]["cpu_us_per_send"]), 0),
            _f(_med(rs, lambda r: r["server"]["rss_peak_mb"]), 0),
            _f(_med(rs, lambda r: r.get("writer", {}).get("commits_per_s", math.nan)), 0),
            _f(_med(rs, lambda r: r.get("writer", {}).get("mean_batch", math.nan)), 1),
            _f(_med(rs, lambda r: r["client_cpu_pct"]), 0),
        ]
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    v_ok = all(run_ok(r) for rs in runs.values() for r in rs)
    rows.append("")
    rows.append("verification: " + ("ok in every run" if v_ok else "FAILED (see stderr)"))
    return "\n".join(rows)


def _emit(
    args: argparse.Namespace, results: list[dict[str, Any]], quiet: bool = False, extra: dict[str, Any] | None = None
) -> None:
    if not quiet:
        for r in results:
            print(describe(r))
    if args.json:
        doc: Any = results if extra is None else {"runs": results, **extra}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, array):
        return None  # raw samples are not written out
    return str(x)


# ---- the big database ------------------------------------------------------------


def _split_sql(script: str) -> list[str]:
    out, cur = [], ""
    for line in script.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            out.append(cur.strip())
            cur = ""
    return [s for s in out if s]


def generate_db(path: Path, messages: int, agents: int, unread: int, body_bytes: int, chunk: int = 500_000) -> float:
    """Write a busd database of ``messages`` direct messages to ``agents``
    agents, round robin, over the last three days; the newest ``unread`` of
    every inbox are unread, the rest read. Uses busd's own schema, filled in
    bulk inside SQLite (no fsync, no journal: this is a generator, not the
    daemon), indexes built afterwards. Returns seconds taken."""
    from . import db as busd_db

    if agents * unread > messages:
        raise BenchError("agents * unread exceeds messages")
    t0 = time.monotonic()
    tmp = path.with_name(path.name + ".tmp")
    for p in (tmp, Path(str(tmp) + "-journal")):
        p.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            "locking_mode = EXCLUSIVE",
            "cache_size = -524288",
            "temp_store = FILE",
        ):
            conn.execute(f"PRAGMA {pragma}")
        statements = [s for m in busd_db.MIGRATIONS for s in _split_sql(m)]
        tables = [s for s in statements if s.upper().startswith("CREATE TABLE")]
        later = [s for s in statements if not s.upper().startswith("CREATE TABLE")]
        for s in tables:
            conn.execute(s)
        cut = messages - agents * unread  # ids above this are unread
        base = conn.execute("SELECT julianday('now') - 3.0").fetchone()[0]
        step = 3.0 / messages
        pad = "x" * max(1, body_bytes)
        for lo in range(1, messages + 1, chunk):
            hi = min(messages, lo + chunk - 1)
            conn.execute("BEGIN")
            conn.execute(
                "WITH RECURSIVE c(x) AS (SELECT ? UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                "INSERT INTO messages (id, sender, recipient, subject, body, reply_to, ts, key, recipients) "
                "SELECT x, printf('agent-%04d', (x + 1) % ?), printf('agent-%04d', x % ?), 'task ' || x, "
                "x || ' ' || ?, NULL, strftime('%Y-%m-%dT%H:%M:%fZ', ? + x * ?), NULL, 1 FROM c",
                (lo, hi, agents, agents, pad, base, step),
            )
            conn.execute(
                "INSERT INTO inbox (message_id, agent, read_at) "
                "SELECT id, recipient, CASE WHEN id > ? THEN NULL ELSE ts END FROM messages WHERE id BETWEEN ? AND ?",
                (cut, lo, hi),
            )
            conn.execute("COMMIT")
            if hi == messages or (hi // chunk) % 4 == 0:
                print(
                    f"bench: {path.name}: {hi:,} of {messages:,} messages ({time.monotonic() - t0:.0f} s)",
                    file=sys.stderr,
                )
        last = conn.execute("SELECT ts FROM messages WHERE id = ?", (messages,)).fetchone()[0]
        conn.executemany(
            "INSERT INTO agents (name, known, last_seen, unread) VALUES (?, 1, ?, ?)",
            [(f"agent-{i:04d}", last, unread) for i in range(agents)],
        )
        for s in later:
            conn.execute(s)
        print(f"bench: {path.name}: indexes built ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        if not seq or seq[0] != messages:
            raise BenchError(f"sqlite_sequence is {seq}, expected {messages}")
        conn.execute(f"PRAGMA user_version = {busd_db.SCHEMA_VERSION}")
        conn.execute("PRAGMA locking_mode = NORMAL")
        conn.execute("PRAGMA journal_mode = WAL")  # stored in the file; as busd leaves it
    finally:
        conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    tmp.rename(path)
    meta = {
        "messages": messages,
        "agents": agents,
        "unread": unread,
        "body_bytes": body_bytes,
        "seconds": round(time.monotonic() - t0, 1),
        "bytes": path.stat().st_size,
    }
    Path(str(path) + ".json").write_text(json.dumps(meta))
    return time.monotonic() - t0


def ensure_db(path: Path, messages: int, agents: int, unread: int, body_bytes: int, regen: bool) -> dict[str, Any]:
    meta_path = Path(str(path) + ".json")
    want = {"messages": messages, "agents": agents, "unread": unread, "body_bytes": body_bytes}
    if not regen and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return meta
    print(f"bench: generating {path} ({messages:,} messages) ...", file=sys.stderr)
    generate_db(path, messages, agents, unread, body_bytes)
    return json.loads(meta_path.read_text())


def probe_inbox(d: Daemon, token: str | None, agents: int, reads: int, limit: int, seed: int = 7) -> list[float]:
    """Sequential inbox reads (no ack, no wait) of random agents: latencies (s)."""
    rng = random.Random(seed)
    out: list[float] = []
    with SyncJsonl(d.host, d.port, token) as c:
        for i in range(reads + 100):
            agent = f"agent-{rng.randrange(agents):04d}"
            line = b'{"id":%d,"method":"inbox","params":{"agent":"%s","limit":%d}}\n' % (i, agent.encode(), limit)
            t = time.perf_counter()
            rep = inbox_reply_dec.decode(c.call_raw(line))
            dt = time.perf_counter() - t
            if rep.result is None or not rep.result.messages:
                raise BenchError(f"inbox probe of {agent}: {rep.error or 'empty'}")
            if i >= 100:  # the first 100 warm up
                out.append(dt)
    return out


def scenario_bigdb(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    token = args.token if args.token is not None else DEFAULT_TOKEN
    dbs = {
        "small": (out / f"bigdb-{args.small}.db", args.small),
        "big": (out / f"bigdb-{args.messages}.db", args.messages),
    }
    metas = {k: ensure_db(p, n, args.agents, args.unread, args.body_bytes, args.regen) for k, (p, n) in dbs.items()}
    info = machine_info(args, node=False)
    # Retention off for these runs: the files are generated once and reused, and
    # a sweep of week-old read messages would change them under the bench.
    extra = ("--retention-days", "36500")
    res: dict[str, dict[str, list[float]]] = {
        k: {"listen": [], "ready": [], "p50": [], "p99": [], "rss": []} for k in dbs
    }
    for rep in range(args.repeat):
        for k in ["small", "big"] if rep % 2 == 0 else ["big", "small"]:
            path, _ = dbs[k]
            d = start_busd(path, token, extra)
            try:
                lat = probe_inbox(d, token, args.agents, args.reads, args.limit)
                res[k]["rss"].append(d.status_kb("VmHWM") / 1024)
            finally:
                d.stop()
            res[k]["listen"].append(d.startup_s)
            res[k]["ready"].append(d.ready_s)
            res[k]["p50"].append(pct(lat, 50))
            res[k]["p99"].append(pct(lat, 99))
            print(
                f"bigdb {k}: start-up {d.startup_s:.3f} s (first reply {d.ready_s:.3f} s), "
                f"inbox p50 {pct(lat, 50):.3f} ms p99 {pct(lat, 99):.3f} ms",
                file=sys.stderr,
            )
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in res.items()}
    rows = [
        describe_machine(info),
        "",
        f"Inbox reads: {args.reads} sequential JSON-lines reads (limit {args.limit}, {args.unread} unread per inbox, "
        f"{args.agents} agents), medians of {args.repeat} daemon starts per database",
        "",
        "| database | messages | file MB | start-up to listening s | to first reply s | inbox read p50 ms | p99 ms "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, (_, n) in dbs.items():
        m = med[k]
        rows.append(
            f"| {k} | {n:,} | {metas[k]['bytes'] / 2**20:,.0f} | {m['listen']:.3f} | {m['ready']:.3f} | "
            f"{m['p50']:.3f} | {m['p99']:.3f} | {m['rss']:.0f} |"
        )
    ratio = med["big"]["p50"] / med["small"]["p50"]
    rows += [
        "",
        f"inbox read p50 ratio big/small: {ratio:.2f}× (target ≤ 1.5×); "
        f"start-up on the big database: {med['big']['ready']:.3f} s to first reply (target ≤ 2 s)",
    ]
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": res, "medians": med, "ratio": ratio, "dbs": metas, "machine": info}, indent=1)
        )
    return 0


# ---- command line ----------------------------------------------------------------


def _common(p: argparse.ArgumentParser, agents: int, transport: bool = True) -> None:
    p.add_argument("--target", choices=["busd", "node"], default="busd", help="daemon to start (default busd)")
    p.add_argument("--url", metavar="URL", help="drive a daemon already running at URL (http://127.0.0.1:7700) instead")
    p.add_argument(
        "--token", metavar="T", help=f"token (default {DEFAULT_TOKEN} for daemons the bench starts, none for --url)"
    )
    p.add_argument("--agents", metavar="N", type=int, default=agents, help=f"concurrent agents (default {agents})")
    if transport:
        p.add_argument("--transport", choices=["jsonl", "http"], default="jsonl", help="wire protocol (default jsonl)")
    p.add_argument(
        "--workers", metavar="N", type=int, default=os.cpu_count() or 2, help="client processes (default: one per core)"
    )
    p.add_argument("--body-bytes", metavar="N", type=int, default=100, help="padding in each body (default 100)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--out", metavar="DIR", default=str(OUT), help="scratch directory (default bench/out)")
    p.add_argument("--keep-db", action="store_true", help="keep each run's database")
    p.add_argument("--node-dir", metavar="DIR", default=str(OUT / "node-bus"), help="writable copy of the Node peer")
    p.add_argument("--node-src", metavar="DIR", default=str(NODE_SRC), help="the Node peer to copy from")
    p.add_argument(
        "--switch-interval",
        metavar="S",
        type=float,
        help="experiment: run busd with sys.setswitchinterval(S) (Python's default is 0.005)",
    )
    if transport:
        p.add_argument("--reps", metavar="N", type=int, default=1, help="runs, each on a fresh daemon (default 1)")
        p.add_argument(
            "--profile",
            metavar="PATH",
            help="py-spy the daemon during the run (.svg flame graph, .txt raw stacks, .json speedscope)",
        )
        p.add_argument(
            "--thread-states",
            action="store_true",
            help="sample the state of each daemon thread from /proc during the run (an off-CPU view)",
        )
        p.add_argument(
            "--profile-gil",
            action="store_true",
            help="sample only the thread holding the GIL (where Python CPU goes, not waits)",
        )


def _add_scenarios(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    c = sub.add_parser("closed", help="agents sending as fast as replies come")
    _common(c, 200)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--duration", metavar="S", type=float, help="seconds of load (default 5)")
    g.add_argument("--count", metavar="N", type=int, help="total sends instead of a duration")
    c.set_defaults(scenario_fn=scenario_closed)

    o = sub.add_parser("open", help="a fixed send rate while agents long-poll; delivery latency")
    _common(o, 1000)
    o.add_argument("--rate", metavar="R", type=float, default=200.0, help="total sends per second (default 200)")
    o.add_argument("--duration", metavar="S", type=float, default=10.0, help="seconds of load (default 10)")
    o.add_argument("--wait", metavar="S", type=float, default=30.0, help="long-poll wait (default 30)")
    o.set_defaults(scenario_fn=scenario_open)

    i = sub.add_parser("idle", help="connected agents long-polling, no traffic: server CPU and RSS")
    _common(i, 1000)
    i.add_argument("--interval", metavar="S", type=float, default=10.0, help="seconds measured (default 10)")
    i.add_argument("--wait", metavar="S", type=float, default=30.0, help="long-poll wait (default 30)")
    i.set_defaults(scenario_fn=scenario_idle)

    b = sub.add_parser("bigdb", help="start-up and inbox reads on a 10M-message database vs a 10k one")
    b.add_argument("--messages", metavar="N", type=int, default=10_000_000, help="messages in the big database")
    b.add_argument("--small", metavar="N", type=int, default=10_000, help="messages in the small database")
    b.add_argument("--agents", metavar="N", type=int, default=100, help="inboxes (default 100)")
    b.add_argument("--unread", metavar="N", type=int, default=100, help="unread messages per inbox (default 100)")
    b.add_argument("--limit", metavar="N", type=int, default=100, help="limit of each inbox read (default 100)")
    b.add_argument("--reads", metavar="N", type=int, default=2000, help="timed inbox reads per start (default 2000)")
    b.add_argument("--repeat", metavar="N", type=int, default=3, help="daemon starts per database (default 3)")
    b.add_argument("--body-bytes", metavar="N", type=int, default=100, help="padding in each body (default 100)")
    b.add_argument("--regen", action="store_true", help="generate the databases again")
    b.add_argument("--token", metavar="T")
    b.add_argument("--out", metavar="DIR", default=str(OUT))
    b.add_argument("--json", metavar="PATH")
    b.set_defaults(scenario_fn=scenario_bigdb)

    m = sub.add_parser("compare", help="busd and the Node peer side by side (closed loop), markdown table")
    _common(m, 200, transport=False)
    m.add_argument("--duration", metavar="S", type=float, default=5.0, help="seconds per run (default 5)")
    m.add_argument("--reps", metavar="N", type=int, default=3, help="runs of each system (default 3)")
    m.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    m.set_defaults(scenario_fn=scenario_compare)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to a ``busd`` command line (``cli.py``)."""
    p = subparsers.add_parser(
        "bench",
        help="load generator and benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_scenarios(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        return int(args.scenario_fn(args))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="busd bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_scenarios(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
