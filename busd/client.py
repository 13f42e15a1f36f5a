"""Clients for busd over its native JSON-lines protocol.

``Client`` blocks (plain sockets: for the many agents that are synchronous
scripts); ``AsyncClient`` is the same API for trio. Both::

    with Client(agent="coder") as bus:          # or BUSD_URL, BUSD_TOKEN, BUSD_AGENT
        bus.send("manager", "done", subject="Build login")
        for m in bus.inbox(wait=30):
            ...
        bus.ack(m.id)

They connect lazily, authenticate, and keep a few idle connections for reuse.
A call that cannot reach the bus retries with capped exponential backoff and
jitter for at most ``Backoff.total`` seconds, then raises ``BusUnreachable``.
Every refusal is a ``BusClientError`` whose ``reason`` is the contract's error
code (``retry_after`` set for ``rate_limited``); ``BusUnreachable`` is one too
(reason ``unavailable``).

Every send carries an idempotency key (a fresh one unless the caller gives
one), so a retry after a lost reply never stores a message twice. When the bus
cannot be reached, or refuses a send only for now (``rate_limited``,
``inbox_full``, ``unavailable``), the send is put in the local outbox
(``busd.outbox``) and ``send`` returns ``Sent(queued=True)``. The next call
that reaches the bus, or ``flush()``, delivers queued messages first, in the
order they were queued, with their keys; while a sender has messages queued,
its new sends are queued behind them. Final refusals (``bad_request``,
``unauthorized``, ``forbidden``, ``not_found``, ``too_large``) are never
queued: the caller gets the error at once.

A URL is ``host:port``, ``host`` or ``http://host:port``. Either way the client
speaks JSON lines to that port: the daemon's main port speaks both protocols.
(An extra HTTP-only port, ``--http-port``, will not do.)

The protocol pieces are sans-IO and shared: ``Session`` encodes requests with
the wire Structs and decodes replies into the wire result Structs; the two
clients only move bytes and sleep between attempts.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
from msgspec import Raw, Struct

from .errors import Reason
from .framing import MAX_LINE, LineBuffer, LineTooLong
from .outbox import Entry, Outbox, default_path
from .wire import (
    BROADCAST,
    AckParams,
    AckResult,
    AgentInfo,
    AgentsResult,
    AuthParams,
    ErrorObject,
    InboxParams,
    InboxResult,
    Message,
    NoParams,
    OkResult,
    PingResult,
    Request,
    RequestId,
    SendParams,
    SendResult,
    StatsResult,
    encoder,
    send_decoder,
)

if TYPE_CHECKING:
    from .aclient import AsyncClient

__all__ = [
    "AgentInfo",
    "AsyncClient",
    "Backoff",
    "BusClientError",
    "BusUnreachable",
    "Client",
    "FlushReport",
    "Message",
    "PingResult",
    "Sent",
    "Session",
    "StatsResult",
    "parse_url",
]


def __getattr__(name: str) -> Any:
    # AsyncClient lives in .aclient so that the blocking client and the
    # command line do not pay for importing trio.
    if name == "AsyncClient":
        from .aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger(__name__)

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 7700
MAX_REPLY = 512 * 1024 * 1024  # an inbox page of big messages is far over the request cap of 1 MiB
RECV_SIZE = 65536
MAX_IDLE = 4  # idle connections kept per client
ENVELOPE = 64  # bytes a request line adds around its params

# Refusals that will not change on a retry: never queued, raised at once.
FINAL = frozenset({Reason.BAD_REQUEST, Reason.UNAUTHORIZED, Reason.FORBIDDEN, Reason.NOT_FOUND, Reason.TOO_LARGE})

# ---- results and errors -----------------------------------------------------


class Sent(Struct, kw_only=True, omit_defaults=True):
    """What ``send`` returns: the bus's receipt, or ``queued=True`` (and no
    id yet) when the message waits in the local outbox."""

    key: str
    id: int | None = None
    timestamp: str | None = None
    recipients: int | None = None
    duplicate: bool = False  # the bus already had this key (an earlier try got through)
    queued: bool = False


class FlushReport(Struct, kw_only=True):
    """What ``flush`` did. ``failed`` were refused for good: they stay in the
    outbox file, marked, and are not tried again."""

    delivered: list[Sent]
    failed: list[Entry]
    remaining: int  # still queued for this bus
    reached: bool  # False: the bus could not be reached


class BusClientError(Exception):
    """Every failure a client call reports. ``reason`` is the contract's error
    code (a ``busd.errors.Reason`` when it is one of them, which compares equal
    to the plain string); ``retry_after`` is set for ``rate_limited``; ``code``
    is the JSON-RPC error code when the bus sent one; ``key`` is the send's
    idempotency key (retry with it and the message is stored at most once)."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retry_after: float | None = None,
        code: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        try:
            self.reason: str = Reason(reason)
        except ValueError:
            self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.code = code
        self.key = key

    def __str__(self) -> str:
        extra = f" (retry after {self.retry_after:g}s)" if self.retry_after is not None else ""
        return f"{self.reason}: {self.message}{extra}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.reason)!r}, {self.message!r})"


class BusUnreachable(BusClientError):
    """The bus could not be reached within the call's retry budget."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(Reason.UNAVAILABLE, message, key=key)


class _Lost(Exception):
    """The connection failed (refused, reset, closed, timed out): retry."""


# ---- addresses and backoff --------------------------------------------------


def parse_url(url: str) -> tuple[str, int]:
    """``host:port``, ``host``, ``[::1]:port`` or ``http://host:port`` ->
    (host, port). Raises ValueError."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else "//" + text)
    if parts.scheme not in ("", "http", "tcp"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r} (use host:port or http://host:port)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    host = parts.hostname or DEFAULT_HOST
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path in {url!r} (use host:port or http://host:port)")
    return host, DEFAULT_PORT if port is None else port


@dataclass(frozen=True)
class Backoff:
    """Retrying a call that cannot reach the bus: waits grow from ``initial``
    by ``factor`` up to ``maximum``, each scaled by a random 0.5 to 1 (jitter),
    and the call gives up once ``total`` seconds of retrying have passed.
    ``total=0`` makes one attempt only."""

    initial: float = 0.1
    maximum: float = 2.0
    factor: float = 2.0
    total: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.maximum, self.initial * self.factor**attempt)
        return rng.uniform(cap / 2, cap)


class _Attempts:
    """The retry budget of one call."""

    def __init__(self, backoff: Backoff, rng: random.Random, now: float, once: bool) -> None:
        self.backoff = backoff
        self.rng = rng
        self.deadline = now + (0.0 if once else backoff.total)
        self.n = 0

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next attempt, or None: give up."""
        delay = self.backoff.delay(self.n, self.rng)
        self.n += 1
        if now + delay > self.deadline:
            return None
        return delay

    def connect_timeout(self, limit: float, now: float) -> float:
        if self.n == 0:
            return limit  # the first attempt always gets its full chance
        return max(0.05, min(limit, self.deadline - now))


# ---- the sans-IO protocol ---------------------------------------------------


class Reply(Struct):
    """A JSON-RPC reply; ``result`` is decoded later, by method."""

    id: RequestId = None
    result: Raw = Raw(b"")
    error: ErrorObject | None = None
    jsonrpc: str = "2.0"


reply_decoder = msgspec.json.Decoder(Reply)

RESULTS: dict[str, type[Struct]] = {
    "auth": OkResult,
    "send": SendResult,
    "inbox": InboxResult,
    "ack": AckResult,
    "agents": AgentsResult,
    "stats": StatsResult,
    "ping": PingResult,
}
RESULT_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {m: msgspec.json.Decoder(t) for m, t in RESULTS.items()}


class Session:
    """One connection's protocol state, without I/O: ``request`` encodes a
    call, ``feed`` takes received bytes, ``take`` returns a call's reply once
    it is in, and ``result`` turns a reply into its result Struct or raises."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._lines = LineBuffer(MAX_REPLY)
        self._replies: dict[RequestId, Reply] = {}

    def request(self, method: str, params: Struct) -> tuple[int, bytes]:
        rid = next(self._ids)
        line = encoder.encode(Request(method, rid, Raw(encoder.encode(params)))) + b"\n"
        if len(line) > MAX_LINE:
            raise BusClientError(Reason.TOO_LARGE, f"request of {len(line)} bytes is over the 1 MiB line limit")
        return rid, line

    def feed(self, data: bytes) -> None:
        try:
            lines = self._lines.feed(data)
        except LineTooLong:
            raise _Lost("reply line too long") from None
        for line in lines:
            if line.startswith(b"HTTP/"):
                raise BusClientError(
                    Reason.BAD_REQUEST,
                    "the bus answered in HTTP: this port is HTTP-only; use the daemon's main port",
                )
            if not line.strip():
                continue
            try:
                reply = reply_decoder.decode(line)
            except msgspec.DecodeError as e:
                raise BusClientError(Reason.UNAVAILABLE, f"unreadable reply from the bus: {e}") from None
            self._replies[reply.id] = reply

    def take(self, rid: int) -> Reply | None:
        """The reply to ``rid`` if it has come. A reply without an id (the bus
        could not read the request) answers the one request in flight."""
        reply = self._replies.pop(rid, None)
        if reply is None:
            reply = self._replies.pop(None, None)
        return reply

    @staticmethod
    def result(method: str, reply: Reply) -> Any:
        if reply.error is not None:
            raise _refusal(reply.error)
        try:
            return RESULT_DECODERS[method].decode(reply.result)
        except msgspec.DecodeError as e:
            raise BusClientError(Reason.UNAVAILABLE, f"unexpected {method} result from the bus: {e}") from None


def _refusal(err: ErrorObject) -> BusClientError:
    reason = err.data.get("reason")
    retry = err.data.get("retry_after")
    return BusClientError(
        reason if isinstance(reason, str) else Reason.UNAVAILABLE,
        err.message,
        retry_after=float(retry) if isinstance(retry, (int, float)) and not isinstance(retry, bool) else None,
        code=err.code,
    )


def new_key() -> str:
    return uuid.uuid4().hex


# ---- what both clients share ------------------------------------------------


class _Base:
    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        agent: str | None = None,
        outbox: str | os.PathLike[str] | bool = True,
        retry: Backoff = Backoff(),
        connect_timeout: float = 3.0,
        timeout: float = 30.0,
    ) -> None:
        """``url``, ``token`` and ``agent`` default to $BUSD_URL (else
        localhost:7700), $BUSD_TOKEN and $BUSD_AGENT. ``agent`` is the default
        sender and inbox. ``outbox``: True for the default file ($BUSD_OUTBOX,
        else $XDG_STATE_HOME/busd/outbox.db), a path, or False for none (then
        a send that cannot reach the bus raises BusUnreachable).
        ``connect_timeout`` bounds one connection attempt, ``timeout`` the wait
        for one reply (plus the ``wait`` of a long poll)."""
        self.url = url or os.environ.get("BUSD_URL") or f"{DEFAULT_HOST}:{DEFAULT_PORT}"
        self.host, self.port = parse_url(self.url)
        self.bus = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.token = token if token is not None else (os.environ.get("BUSD_TOKEN") or None)
        self.agent = agent or os.environ.get("BUSD_AGENT") or None
        if outbox is True:
            self.outbox: Outbox | None = Outbox(default_path())
        elif outbox is False:
            self.outbox = None
        else:
            self.outbox = Outbox(outbox)
        self.retry = retry
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._rng = random.Random()
        # Senders with messages in the outbox that this client must deliver
        # before their new ones; None until read from the file.
        self._waiting: set[str] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bus!r}, agent={self.agent!r})"

    def _name(self, given: str | None, what: str) -> str:
        name = given or self.agent
        if not name:
            raise BusClientError(Reason.BAD_REQUEST, f"no {what}: pass one, or set agent= or BUSD_AGENT")
        return name

    def _send_params(
        self, to: str, body: str, subject: str, from_: str | None, reply_to: int | None, key: str | None
    ) -> SendParams:
        """The send's params, checked as the bus would check them (so a send
        the bus would refuse is not queued) and with a key."""
        params = SendParams(
            from_=self._name(from_, "sender"),
            to=to,
            body=body,
            subject=subject,
            key=new_key() if key is None else key,
            reply_to=reply_to,
        )
        try:
            params = send_decoder.decode(encoder.encode(params))
        except msgspec.ValidationError as e:
            raise BusClientError(Reason.BAD_REQUEST, f"invalid send: {e}", key=params.key) from None
        if params.from_.upper() == BROADCAST:
            raise BusClientError(Reason.BAD_REQUEST, "ALL is reserved and names no agent", key=params.key)
        if params.to != BROADCAST and params.to.upper() == BROADCAST:
            raise BusClientError(Reason.BAD_REQUEST, "to broadcast, send to 'ALL' in capitals", key=params.key)
        size = len(encoder.encode(params)) + ENVELOPE
        if size > MAX_LINE:
            raise BusClientError(Reason.TOO_LARGE, f"send of {size} bytes is over the 1 MiB line limit", key=params.key)
        return params

    def _inbox_params(self, agent: str | None, wait: float, limit: int, ack: int, after: int) -> InboxParams:
        return InboxParams(agent=self._name(agent, "agent"), ack=ack, limit=limit, wait=wait, after=after)

    def _ack_params(self, up_to: int | None, ids: list[int] | None, agent: str | None) -> AckParams:
        if up_to is None and ids is None:
            raise BusClientError(Reason.BAD_REQUEST, "give up_to or ids")
        return AckParams(agent=self._name(agent, "agent"), up_to=up_to, ids=ids)

    def _queueable(self, e: BusClientError) -> bool:
        return self.outbox is not None and (isinstance(e, BusUnreachable) or e.reason not in FINAL)


def _about_the_message(err: BusClientError) -> bool:
    """Whether a failed send was the bus's answer to that message (and not
    to the connection: a wrong token, a port that speaks HTTP only)."""
    return err.code is not None and err.reason != Reason.UNAUTHORIZED


def _sent(key: str, r: SendResult) -> Sent:
    return Sent(key=key, id=r.id, timestamp=r.timestamp, recipients=r.recipients, duplicate=r.duplicate is True)


class _Flush:
    """Book-keeping of one pass over the outbox (the I/O is the client's)."""

    def __init__(self, box: Outbox, entries: list[Entry]) -> None:
        self.box = box
        self.entries = entries
        self.delivered: list[Sent] = []
        self.failed: list[Entry] = []
        self.blocked: set[str] = set()  # senders to skip: order within a sender is kept
        self.skipped: set[str] = set()  # refused as forbidden: maybe another agent's, left for it
        self.reached = True

    def done(self, e: Entry, r: SendResult) -> None:
        self.box.remove(e.seq)
        self.delivered.append(_sent(e.key, r))

    def refused(self, e: Entry, err: BusClientError) -> None:
        self.blocked.add(e.from_)
        if err.reason == Reason.FORBIDDEN:
            self.skipped.add(e.from_)
        elif err.reason in FINAL:
            self.box.fail(e.seq, str(err))
            self.failed.append(msgspec.structs.replace(e, error=str(err)))
            self.blocked.discard(e.from_)  # out of the queue: later ones may go
            log.warning("outbox: %s to %s (key %s) refused for good: %s", e.from_, e.to, e.key, err)

    def report(self, bus: str) -> tuple[FlushReport, set[str]]:
        """The report, and the senders still to wait for."""
        left = self.box.pending(bus)
        waiting = {e.from_ for e in left} - self.skipped
        return FlushReport(delivered=self.delivered, failed=self.failed, remaining=len(left), reached=self.reached), (
            waiting
        )


# ---- the blocking client ----------------------------------------------------


class _SyncConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.session = Session()

    def roundtrip(self, method: str, params: Struct, timeout: float) -> Reply:
        rid, line = self.session.request(method, params)
        deadline = time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(line)
            while (reply := self.session.take(rid)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _Lost("no reply in time")
                self.sock.settimeout(left)
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    raise _Lost("connection closed by the bus")
                self.session.feed(data)
        except OSError as e:  # includes socket timeouts
            raise _Lost(str(e) or type(e).__name__) from None
        return reply

    def close(self) -> None:
        self.sock.close()


class Client(_Base):
    """The blocking client. Thread-safe; use as a context manager or call
    ``close()``. See the module docstring."""

    def __init__(self, url: str | None = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._idle: list[_SyncConn] = []
        self._pool_lock = threading.Lock()
        self._outbox_lock = threading.RLock()  # outbox state; held through a flush

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self.outbox is not None:
            self.outbox.close()

    # -- the API ---------------------------------------------------------------

    def send(
        self,
        to: str,
        body: str,
        *,
        subject: str = "",
        from_: str | None = None,
        reply_to: int | None = None,
        key: str | None = None,
    ) -> Sent:
        """Send one message (to an agent, or "ALL"). Returns the receipt, or
        ``Sent(queued=True)`` when it went to the outbox."""
        params = self._send_params(to, body, subject, from_, reply_to, key)
        assert params.key is not None
        self._flush_first()
        with self._outbox_lock:
            if self._waiting and params.from_ in self._waiting:
                return self._queue(params)  # behind this sender's queued ones
        try:
            return _sent(params.key, self._call("send", params))
        except BusClientError as e:
            e.key = params.key
            if not self._queueable(e):
                raise
            with self._outbox_lock:
                return self._queue(params, e)

    def inbox(
        self, agent: str | None = None, *, wait: float = 0.0, limit: int = 100, ack: int = 0, after: int = 0
    ) -> list[Message]:
        """The unread messages of ``agent`` (default: this client's), oldest
        first; with ``wait``, hold on up to that many seconds for one to come.
        ``ack`` acks up to that id first; ``after`` skips ids up to it."""
        params = self._inbox_params(agent, wait, limit, ack, after)
        self._flush_first()
        result: InboxResult = self._call("inbox", params, wait=wait)
        return result.messages

    def ack(self, up_to: int | None = None, *, ids: list[int] | None = None, agent: str | None = None) -> int:
        """Mark read every message with id <= ``up_to`` (or just ``ids``);
        returns how many were newly read."""
        params = self._ack_params(up_to, ids, agent)
        self._flush_first()
        result: AckResult = self._call("ack", params)
        return result.acked

    def agents(self) -> list[AgentInfo]:
        self._flush_first()
        result: AgentsResult = self._call("agents", NoParams())
        return result.agents

    def stats(self) -> StatsResult:
        self._flush_first()
        result: StatsResult = self._call("stats", NoParams())
        return result

    def ping(self) -> PingResult:
        self._flush_first()
        result: PingResult = self._call("ping", NoParams())
        return result

    def flush(self) -> FlushReport:
        """Deliver what the outbox holds for this bus, in order."""
        with self._outbox_lock:
            return self._flush(once=False)

    def queued(self) -> list[Entry]:
        """The outbox's messages for this bus still to deliver."""
        return self.outbox.pending(self.bus) if self.outbox is not None else []

    # -- the outbox ------------------------------------------------------------

    def _queue(self, params: SendParams, cause: BusClientError | None = None) -> Sent:
        assert self.outbox is not None and params.key is not None
        try:
            self.outbox.put(self.bus, params)
        except Exception as e:
            raise BusUnreachable(
                f"{cause or 'messages queued before it'}; and the outbox {self.outbox.path} failed: {e}", key=params.key
            ) from None
        if self._waiting is None:
            self._waiting = set()
        self._waiting.add(params.from_)
        log.info("queued %s -> %s (key %s) in %s: %s", params.from_, params.to, params.key, self.outbox.path, cause)
        return Sent(key=params.key, queued=True)

    def _flush_first(self) -> None:
        """Before a call: deliver queued messages if there are any of ours,
        trying to connect once (a long retry here would only delay the call)."""
        if self.outbox is None or self._waiting == set():
            return
        with self._outbox_lock:
            if self._waiting is None:
                self._waiting = self.outbox.senders(self.bus)
            if self._waiting:
                self._flush(once=True)

    def _flush(self, once: bool) -> FlushReport:
        if self.outbox is None:
            return FlushReport(delivered=[], failed=[], remaining=0, reached=True)
        run = _Flush(self.outbox, self.outbox.pending(self.bus))
        for e in run.entries:
            if e.from_ in run.blocked:
                continue
            try:
                r = self._call("send", e.params, once=once)
            except BusUnreachable:
                run.reached = False
                break
            except BusClientError as err:
                if not _about_the_message(err):
                    raise
                run.refused(e, err)
                continue
            run.done(e, r)
        report, self._waiting = run.report(self.bus)
        return report

    # -- the connection pool and the retry loop --------------------------------

    def _call(self, method: str, params: Struct, *, wait: float = 0.0, once: bool = False) -> Any:
        attempts = _Attempts(self.retry, self._rng, time.monotonic(), once)
        while True:
            with self._pool_lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._connect(attempts.connect_timeout(self.connect_timeout, time.monotonic()))
                reply = conn.roundtrip(method, params, self.timeout + wait)
            except _Lost as e:
                if conn is not None:
                    conn.close()
                if reused:
                    continue  # the bus closed an idle connection: try a fresh one at once
                delay = attempts.next_delay(time.monotonic())
                if delay is None:
                    raise BusUnreachable(f"cannot reach the bus at {self.bus}: {e}") from None
                log.debug("bus at %s unreachable (%s); retrying in %.2fs", self.bus, e, delay)
                time.sleep(delay)
                continue
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            self._release(conn, reply)
            return Session.result(method, reply)

    def _connect(self, timeout: float) -> _SyncConn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise _Lost(str(e) or type(e).__name__) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _SyncConn(sock)
        if self.token is not None:
            try:
                Session.result("auth", conn.roundtrip("auth", AuthParams(token=self.token), self.timeout))
            except BaseException:
                conn.close()
                raise
        return conn

    def _release(self, conn: _SyncConn, reply: Reply) -> None:
        if reply.id is None:  # the bus could not read our request and may close
            conn.close()
            return
        with self._pool_lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

