"""Support for the abuse, fuzz and auth-hardening tests: a busd child process
whose timing constants may be shortened, its memory from /proc, a probe
client that measures round trips while an attack runs, and checkers that a
stream of reply bytes is well-formed for either transport.

    async with spawn_daemon(db, "--max-connections", "64",
                            patches={"busd.jsonl.WRITE_TIMEOUT": 2.0}) as d:
        before = memory(d.pid)
        async with probing(d.port) as probe:
            ...  # the attack
        after = memory(d.pid)
        probe.check()  # every round trip well under a second

``patches`` set module constants in the child before it starts (timing only:
the daemon's network and database stay real). Everything here talks to
127.0.0.1 only and every wait is bounded.
"""

from __future__ import annotations

import json
import math
import re
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..daemon import EXIT_TIMEOUT, START_TIMEOUT, Daemon, reap, running_daemon

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
REASONS = frozenset(
    ["bad_request", "unauthorized", "forbidden", "not_found", "too_large", "rate_limited", "inbox_full", "unavailable"]
)


def raise_fd_limit(wanted: int = 16384) -> None:
    """For in-process daemons: as cli.py does for the real one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(max(soft, wanted), hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---- a child daemon ---------------------------------------------------------


@asynccontextmanager
async def spawn_daemon(
    db: str,
    *args: str,
    patches: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Daemon]:
    """``busd serve --db DB --port 0 ARGS`` as a child process (tests/daemon.py's
    ``running_daemon``), with module constants set first; yields once it
    listens; killed and reaped on exit if still running."""
    async with running_daemon(db, *args, patches=patches, env=env, cwd=str(ROOT)) as d:
        yield d


# ---- memory -------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    hwm_kb: int  # peak resident set since the process started

    def __str__(self) -> str:
        return f"RSS {self.rss_kb / 1024:.1f} MiB (peak {self.hwm_kb / 1024:.1f} MiB)"


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return Memory(values["VmRSS"], values["VmHWM"])


def growth_mib(before: Memory, after: Memory) -> float:
    """Peak resident memory during the attack above the resident memory
    before it."""
    return (after.hwm_kb - before.rss_kb) / 1024


# ---- sockets ------------------------------------------------------------------


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(HOST, port)


async def read_until_closed(stream: trio.SocketStream, timeout: float, limit: int = 1 << 24) -> tuple[bytes, str]:
    """Everything the peer sends until it closes: (data, "eof" | "reset" |
    "timeout" | "limit")."""
    data = bytearray()
    with trio.move_on_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return bytes(data), "reset"
            if not chunk:
                return bytes(data), "eof"
            data += chunk
            if len(data) > limit:
                return bytes(data), "limit"
    return bytes(data), "timeout"


TCP_ESTABLISHED = 1


def tcp_established(stream: trio.SocketStream) -> bool:
    """Whether the kernel still has the connection up, without reading from
    it (Linux TCP_INFO: the first byte is the state)."""
    info = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] == TCP_ESTABLISHED


class LineReader:
    """Newline-framed replies on a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    async def call(self, method: str, params: dict[str, Any] | None = None, rid: int = 1) -> dict[str, Any]:
        msg: dict[str, Any] = {"id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.stream.send_all(json.dumps(msg).encode() + b"\n")
        while True:
            reply = json.loads(await self.line())
            if reply.get("id") == rid:
                return reply


def http_request(method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: busd"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")


async def http_roundtrip(
    stream: trio.SocketStream, buf: bytearray, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One request, one response on a keep-alive connection; ``buf`` keeps
    bytes read past the response."""
    await stream.send_all(request)
    while True:
        parsed = parse_http_response(bytes(buf))
        if parsed is not None:
            status, headers, body, used = parsed
            del buf[:used]
            if status == 100:
                continue
            return status, headers, body
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk


# ---- well-formed replies --------------------------------------------------------


class Malformed(AssertionError):
    pass


def parse_http_response(data: bytes, to_head: bool = False) -> tuple[int, dict[str, str], bytes, int] | None:
    """(status, headers, body, bytes used) of the first complete response in
    ``data``; None if it is incomplete. Raises Malformed. busd always sends
    Content-Length; a response to a HEAD request (``to_head``) has no body all
    the same (RFC 9110, 9.3.2)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > 65536:
            raise Malformed(f"no end of headers in {len(data)} bytes")
        return None
    head = data[:end].decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.1 (\d{3}) ([^\r\n]*)", head[0])
    if not m:
        raise Malformed(f"bad status line {head[0]!r}")
    status = int(m[1])
    headers: dict[str, str] = {}
    for h in head[1:]:
        name, sep, value = h.partition(":")
        if not sep or not name or name != name.strip():
            raise Malformed(f"bad header line {h!r}")
        headers[name.lower()] = value.strip()
    if 100 <= status < 200:
        return status, headers, b"", end + 4
    if "content-length" not in headers:
        raise Malformed(f"response {status} without content-length: {headers}")
    length = 0 if to_head else int(headers["content-length"])
    if len(data) < end + 4 + length:
        return None
    return status, headers, data[end + 4 : end + 4 + length], end + 4 + length


def request_methods(sent: bytes) -> list[bytes]:
    """The methods of the requests in ``sent``, in order, as far as they
    parse (to know which responses answer HEAD and so have no body)."""
    import httptools

    methods: list[bytes] = []

    class Collect:
        def on_message_begin(self) -> None:
            methods.append(b"")  # not known yet: the request line may not parse

        def on_url(self, url: bytes) -> None:
            methods[-1] = parser.get_method()

    parser = httptools.HttpRequestParser(Collect())
    try:
        parser.feed_data(sent)
    except httptools.HttpParserError:
        pass
    return methods


def check_http_replies(
    data: bytes, *, closed: bool = True, allow_unavailable: bool = False, methods: list[bytes] | None = None
) -> list[int]:
    """Every response in ``data`` is HTTP/1.1 with a JSON body in the
    contract's shape (none for HEAD: ``methods`` of the requests, in order);
    a trailing incomplete response is allowed only if the connection was cut
    mid-write (it never is here, so: not allowed). Returns the statuses."""
    statuses: list[int] = []
    rest = data
    while rest:
        answered = len([s for s in statuses if s != 100])
        head = methods is not None and answered < len(methods) and methods[answered] == b"HEAD"
        parsed = parse_http_response(rest, head)
        if parsed is None:
            raise Malformed(f"truncated response: {rest[:200]!r}")
        status, headers, body, used = parsed
        rest = rest[used:]
        statuses.append(status)
        if status == 100 or head:
            continue  # (a HEAD response's headers were checked; there is no body)
        if not headers.get("content-type", "").startswith("application/json"):
            raise Malformed(f"{status} content-type {headers.get('content-type')!r}")
        try:
            obj = json.loads(body)
        except ValueError:
            raise Malformed(f"{status} body is not JSON: {body[:200]!r}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            raise Malformed(f"{status} body without ok: {body[:200]!r}")
        if obj["ok"] != (status == 200):
            raise Malformed(f"status {status} with ok={obj['ok']}")
        if not obj["ok"]:
            err = obj.get("error")
            if not isinstance(err, dict) or err.get("code") not in REASONS or not isinstance(err.get("message"), str):
                raise Malformed(f"{status} bad error object: {body[:300]!r}")
            if err["code"] == "unavailable" and not allow_unavailable:
                raise Malformed(f"internal error reported: {body[:300]!r}")
        # 507 is inbox_full; 501 was h11's answer to an unknown Transfer-Encoding
        if status >= 500 and status not in (501, 507) and not allow_unavailable:
            raise Malformed(f"server error {status}: {body[:300]!r}")
    return statuses


def check_jsonl_replies(data: bytes, *, allow_unavailable: bool = False) -> list[dict[str, Any]]:
    """Every line is a JSON-RPC 2.0 response: ``result`` xor ``error`` with
    an int code, a message and ``data.reason`` from the contract; no partial
    line at the end."""
    if data and not data.endswith(b"\n"):
        raise Malformed(f"reply does not end in a newline: {data[-200:]!r}")
    replies = []
    for line in data.split(b"\n")[:-1]:
        try:
            obj = json.loads(line)
        except ValueError:
            raise Malformed(f"reply line is not JSON: {line[:200]!r}") from None
        if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0" or "id" not in obj:
            raise Malformed(f"not a JSON-RPC response: {line[:200]!r}")
        if ("result" in obj) == ("error" in obj):
            raise Malformed(f"needs exactly one of result/error: {line[:200]!r}")
        if "error" in obj:
            err = obj["error"]
            ok = (
                isinstance(err, dict)
                and isinstance(err.get("code"), int)
                and isinstance(err.get("message"), str)
                and isinstance(err.get("data"), dict)
                and err["data"].get("reason") in REASONS
            )
            if not ok:
                raise Malformed(f"bad error object: {line[:300]!r}")
            if err["data"]["reason"] == "unavailable" and not allow_unavailable:
                raise Malformed(f"internal error reported: {line[:300]!r}")
        replies.append(obj)
    return replies


JSONL_FIRST = frozenset(b"{ \t\r\n")


def check_replies(sent: bytes, data: bytes, **kw: Any) -> str:
    """Check ``data`` by the protocol the daemon will have chosen for a
    connection that sent ``sent`` first. Returns "jsonl", "http" or "none"."""
    if not sent:
        if data:
            raise Malformed(f"reply to nothing: {data[:200]!r}")
        return "none"
    if sent[0] in JSONL_FIRST:
        check_jsonl_replies(data, **kw)
        return "jsonl"
    check_http_replies(data, methods=request_methods(sent), **kw)
    return "http"


# ---- the probe: a well-behaved client measured during an attack ----------------

# A separate process (stdlib only, blocking sockets), so what it measures is
# the daemon's answer time and not the attacking test's own event loop. It
# connects first (so a full daemon cannot refuse it), says "ready", then
# loops: a JSON-lines ping, an HTTP inbox read, and every third round a
# JSON-lines send; each timed. Closing its stdin stops it; it prints one JSON
# object with the latencies and failures.
_PROBE = r"""
import json, select, socket, sys, time
port, interval, limit = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
lat = {"ping": [], "http": [], "send": []}
slow = []  # (seconds since ready, kind, latency) of answers over 0.1 s
failures = []
t_ready = time.perf_counter()

def connect():
    s = socket.create_connection(("127.0.0.1", port), timeout=limit)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

class Lines:
    def __init__(self, s):
        self.s, self.buf = s, b""
    def call(self, rid, method, params=None):
        msg = {"id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            while b"\n" not in self.buf:
                chunk = self.s.recv(65536)
                if not chunk:
                    raise EOFError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            reply = json.loads(line)
            if reply.get("id") == rid:
                if "result" not in reply:
                    raise RuntimeError(f"refused: {reply}")
                return reply

class Http:
    def __init__(self, s):
        self.s, self.buf = s, b""
    def get(self, target):
        self.s.sendall(f"GET {target} HTTP/1.1\r\nHost: busd\r\n\r\n".encode())
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode("latin-1").split("\r\n")
                length = 0
                for h in head[1:]:
                    k, _, v = h.partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v)
                if len(self.buf) >= end + 4 + length:
                    status = int(head[0].split()[1])
                    self.buf = self.buf[end + 4 + length:]
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}")
                    return
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk

def timed(kind, fn, *args):
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as e:
        failures.append(f"{kind}: {type(e).__name__}: {e}")
        raise
    finally:
        took = time.perf_counter() - t0
        lat[kind].append(took)
        if took > 0.1:
            slow.append((round(t0 - t_ready, 3), kind, round(took, 3)))

jl, http = Lines(connect()), Http(connect())
try:
    jl.call(0, "ping")
    http.get("/healthz")
    print("ready", flush=True)
    t_ready = time.perf_counter()
    n = 0
    while not select.select([sys.stdin], [], [], 0)[0]:
        n += 1
        timed("ping", jl.call, n, "ping")
        timed("http", http.get, "/api/inbox/probe-sink?limit=1")
        if n % 3 == 0:
            timed("send", jl.call, n, "send", {"from": "probe", "to": "probe-sink", "body": f"probe {n}"})
        time.sleep(interval)
except Exception as e:
    if not failures:
        failures.append(f"{type(e).__name__}: {e}")
print(json.dumps({"latencies": lat, "failures": failures, "slow": slow}), flush=True)
"""


@dataclass
class Probe:
    limit: float = 1.0
    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    slow: list[tuple[float, str, float]] = field(default_factory=list)

    def all(self) -> list[float]:
        return [x for v in self.latencies.values() for x in v]

    def summary(self) -> str:
        parts = []
        for kind, xs in sorted(self.latencies.items()):
            if xs:
                parts.append(
                    f"{kind} n={len(xs)} p50={pct(xs, 50) * 1000:.1f}ms "
                    f"p99={pct(xs, 99) * 1000:.1f}ms max={max(xs) * 1000:.1f}ms"
                )
        return "; ".join(parts) or "no samples"

    def check(self, min_rounds: int = 5) -> None:
        """No failure, enough rounds, and p99 and max under ``limit``."""
        assert not self.failures, f"probe failed: {self.failures[:5]} ({self.summary()})"
        xs = self.all()
        assert len(self.latencies.get("ping", [])) >= min_rounds, f"probe hardly ran: {self.summary()}"
        assert pct(xs, 99) < self.limit and max(xs) < self.limit, f"probe too slow: {self.summary()}"


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


@asynccontextmanager
async def probing(port: int, interval: float = 0.05, limit: float = 1.0) -> AsyncIterator[Probe]:
    """A probe process running for the block; its figures are in the yielded
    Probe once the block has ended."""
    probe = Probe(limit=limit)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _PROBE, str(port), str(interval), "10"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None and process.stdout is not None
    out = bytearray()
    try:
        with trio.fail_after(START_TIMEOUT):
            while b"\n" not in out:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    break
                out += chunk
        if not out.startswith(b"ready\n"):
            raise RuntimeError(f"probe did not start: {bytes(out)!r}")
        del out[:6]
        yield probe
        await process.stdin.aclose()
        with trio.fail_after(EXIT_TIMEOUT):
            while True:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    break
                out += chunk
            await process.wait()
        result = json.loads(out)
        probe.latencies = result["latencies"]
        probe.failures = result["failures"]
        probe.slow = [tuple(x) for x in result["slow"]]
    finally:
        await reap(process)


def report(title: str, **figures: Any) -> None:
    """Print one line of figures (shown with pytest -s, and in -rA)."""
    print(f"[{title}] " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
