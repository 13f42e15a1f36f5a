"""The HTTP/1.1 shim for agents that only speak HTTP: POST /api/send,
GET /api/inbox/<agent>, GET /healthz. Requests are parsed by httptools
(llhttp, the parser of Node.js); keep-alive, pipelining, chunked bodies and
100-continue work; sizes are bounded, and a slow or idle client is cut off
(see ``_watch``). Responses are written by hand: always a Content-Length body
of JSON."""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import httptools
import msgspec
import trio

from . import __version__
from .core import Bus
from .errors import BusError, Reason
from .sockio import SocketIO
from .wire import DECODE_ERRORS, HttpError, HttpErrorReply, InboxParams, SendParams, encoder, send_decoder

log = logging.getLogger(__name__)

HTTP_STATUS: dict[Reason, int] = {
    Reason.BAD_REQUEST: 400,
    Reason.UNAUTHORIZED: 401,
    Reason.FORBIDDEN: 403,
    Reason.NOT_FOUND: 404,
    Reason.TOO_LARGE: 413,
    Reason.RATE_LIMITED: 429,
    Reason.INBOX_FULL: 507,
    Reason.UNAVAILABLE: 503,
}
PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}

HEAD_MAX = 16 * 1024  # request line and headers
IDLE_TIMEOUT = 75.0  # keep-alive: waiting for the first byte of a request
REQUEST_TIMEOUT = 15.0  # from a request's first byte to its last
WRITE_TIMEOUT = 30.0


class MethodNotAllowed(Exception):
    def __init__(self, allow: str) -> None:
        self.allow = allow


def ok_body(result: msgspec.Struct) -> bytes:
    """``{"ok": true, ...result's members}``"""
    encoded = encoder.encode(result)
    return b'{"ok":true,' + encoded[1:] if len(encoded) > 2 else b'{"ok":true}'


def error_body(reason: Reason, message: str, retry_after: Any = msgspec.UNSET) -> bytes:
    return encoder.encode(HttpErrorReply(False, HttpError(reason.value, message, retry_after)))


@dataclass(slots=True)
class Request:
    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # names in lower case
    body: bytearray = field(default_factory=bytearray)
    keep_alive: bool = True

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class BadRequest(Exception):
    """A request we answer with ``status`` and then close the connection."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


class HttpConnection:
    """One keep-alive connection, one request at a time: read it (within
    IDLE_TIMEOUT of the last response, then REQUEST_TIMEOUT from its first
    byte), answer it, hand the response to the socket, and read the next one
    only once the client has taken the last one. Pipelined requests wait
    their turn, parsed, in ``_ready``."""

    def __init__(self, bus: Bus, stream: trio.SocketStream, cid: int) -> None:
        self.bus = bus
        self.stream = stream
        self.cid = cid
        cfg = bus.config
        self.max_request = max(1024 * 1024, cfg.max_body * 6 + 16 * 1024)  # JSON may escape 1 byte to 6
        self.io: SocketIO
        self.parser = httptools.HttpRequestParser(self)  # calls the on_* methods below
        self._request = Request()  # the one being parsed
        self._ready: deque[Request] = deque()  # parsed, not yet answered
        self._in_head = True  # the parser is in a request line or headers
        self._head_bytes = 0
        self._upgraded = False  # the parser stopped at an Upgrade request
        self._bad: BadRequest | None = None  # what to answer once the requests before it are
        # for _watch: whether we wait for a request, since when, and why we stopped reading
        self._reading = True
        self._last_active = trio.current_time()  # the last response, or the connection's start
        self._begun: float | None = None  # the current request's first byte
        self._stop: str | None = None
        self._sleep: trio.CancelScope | None = None  # _watch's

    async def run(self, first: bytes) -> None:
        async with trio.open_nursery() as conn:
            self.io = SocketIO(self.stream, conn.cancel_scope, WRITE_TIMEOUT, self.cid)
            try:
                conn.start_soon(self.io.run_drain)
                conn.start_soon(self._watch)
                await self._serve(first)
                await self.io.flushed()
                conn.cancel_scope.cancel()  # done: stop the drain task
            finally:
                self.io.close()

    async def _serve(self, data: bytes) -> None:
        try:
            self._feed(data)
            while True:
                request = await self._next_request()
                if request is None:
                    return
                self._reading = False
                status, payload, headers = await self._respond(request)
                self._reading = True
                self._last_active = trio.current_time()
                close = not request.keep_alive or (self._upgraded and not self._ready)
                self._send(status, payload, headers, close=close, head=request.method == b"HEAD")
                if close or self.io.broken:
                    return
                if self.io.backlog:
                    await self.io.flushed()  # the client reads its response before we read on
        except BadRequest as e:
            log.info("conn=%d bad HTTP request (%d): %s", self.cid, e.status, e.message)
            reason = Reason.TOO_LARGE if e.status == 413 else Reason.BAD_REQUEST
            self._send(e.status, error_body(reason, e.message), close=True, head=self._request.method == b"HEAD")
        except trio.TooSlowError:
            log.info("conn=%d HTTP request too slow; closing", self.cid)
            self._send(
                408,
                error_body(Reason.BAD_REQUEST, "request not received in time"),
                close=True,
                head=self._request.method == b"HEAD",
            )

    async def _next_request(self) -> Request | None:
        """The next complete request, or None at a clean end (EOF, shutdown or
        idleness between requests); TooSlowError for a request begun but not
        finished in time (see _watch), BadRequest for one we refuse."""
        while not self._ready:
            if self._bad is not None:
                raise self._bad
            if self._upgraded:
                return None
            data = self.io.recv_nowait()
            if data is None:
                if self._begun is not None and self._sleep is not None:
                    # a request that does not come in one piece: _watch must
                    # wake in time for its REQUEST_TIMEOUT
                    self._sleep.deadline = min(self._sleep.deadline, self._begun + REQUEST_TIMEOUT)
                data = await self.io.recv()
            if not data:
                if self._stop == "slow":
                    raise trio.TooSlowError
                if self._stop is None and self._begun is not None:
                    raise BadRequest(400, "connection closed in the middle of a request")
                return None  # idle, shutting down, or a clean close between requests
            self._feed(data)
        return self._ready.popleft()

    def _feed(self, data: bytes) -> None:
        """Parse ``data``: complete requests go to ``_ready``; a bad one stops
        the parsing and is answered after those before it."""
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded = True  # answered like any request; the connection closes after it
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ or e.__cause__
            if not isinstance(cause, BadRequest):
                raise
            self._bad = cause
        except httptools.HttpParserError:
            # the parser's message may quote the request, token and all: not echoed
            self._bad = BadRequest(400, "malformed HTTP request")
        if self._in_head and self._head_bytes > HEAD_MAX and self._bad is None:  # headers that never end
            self._bad = BadRequest(431, "request line and headers over 16 KiB")

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self._request = Request()
        self._in_head = True
        self._begun = trio.current_time()

    def on_url(self, url: bytes) -> None:
        self._request.method = self.parser.get_method()  # known from here on (a HEAD is answered without body)
        self._request.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._request.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        r = self._request
        self._in_head = False
        self._head_bytes = 0
        if len(r.target) + sum(len(n) + len(v) + 4 for n, v in r.headers) > HEAD_MAX:
            raise BadRequest(431, "request line and headers over 16 KiB")
        length = r.header(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_request:
            raise BadRequest(413, f"request body over {self.max_request} bytes")
        expect = r.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and self.parser.get_http_version() == "1.1":
            self.io.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it, for bodies over 1 KiB

    def on_body(self, body: bytes) -> None:
        r = self._request
        r.body += body
        if len(r.body) > self.max_request:
            raise BadRequest(413, f"request body over {self.max_request} bytes")

    def on_message_complete(self) -> None:
        self._request.keep_alive = self.parser.should_keep_alive()
        self._ready.append(self._request)
        self._in_head = True
        self._begun = None

    # -- the watchdog ------------------------------------------------------------

    async def _watch(self) -> None:
        """End the reading when a keep-alive connection has waited IDLE_TIMEOUT
        for a request, when a request has taken REQUEST_TIMEOUT from its first
        byte (answered 408), or READ_GRACE after shutdown begins: by shutting
        the socket's read side, so the reader sees EOF (one sleeping task per
        connection instead of a timer on every request)."""
        bus = self.bus
        while not bus.closing:
            now = trio.current_time()
            if not self._reading:  # answering (a long-poll, say): look again later
                deadline = now + IDLE_TIMEOUT
            elif self._begun is not None:
                deadline = min(self._last_active + IDLE_TIMEOUT, self._begun + REQUEST_TIMEOUT)
            else:
                deadline = self._last_active + IDLE_TIMEOUT
            with trio.move_on_at(max(deadline, now)) as self._sleep:
                await bus.closed.wait()
            now = trio.current_time()
            if bus.closing or not self._reading:
                continue
            if self._begun is not None and now >= min(self._last_active + IDLE_TIMEOUT, self._begun + REQUEST_TIMEOUT):
                self._stop = "slow"
                break
            if self._begun is None and now >= self._last_active + IDLE_TIMEOUT:
                self._stop = "idle"  # an idle keep-alive connection: closed quietly
                break
        else:
            await trio.sleep_until(bus.read_deadline)
            self._stop = "closing"
        self.io.stop_reading()

    async def _respond(self, request: Request) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        self.bus.requests += 1
        try:
            result = await self._route(request)
            return 200, ok_body(result), []
        except MethodNotAllowed as e:
            return 405, error_body(Reason.BAD_REQUEST, "method not allowed"), [(b"allow", e.allow.encode())]
        except BusError as e:
            headers = []
            retry_after = e.data.get("retry_after", msgspec.UNSET)
            if retry_after is not msgspec.UNSET:
                headers.append((b"retry-after", b"%d" % math.ceil(float(retry_after))))  # type: ignore[arg-type]
            return HTTP_STATUS[e.reason], error_body(e.reason, e.message, retry_after), headers
        except Exception:
            log.exception("conn=%d %s %s failed", self.cid, request.method, request.target)
            return HTTP_STATUS[Reason.UNAVAILABLE], error_body(Reason.UNAVAILABLE, "internal error"), []

    async def _route(self, request: Request) -> Any:
        url = urlsplit(request.target.decode("latin-1"))
        path = url.path
        method = request.method
        if path == "/healthz":
            if method != b"HEAD":  # (monitors may ask with HEAD: the same answer, without its body)
                _allow(method, b"GET")
            return _Health()
        if path == "/api/send":
            _allow(method, b"POST")
            who = self.bus.authenticate(_bearer(request))
            try:
                params: SendParams = send_decoder.decode(request.body)
            except DECODE_ERRORS as e:
                raise BusError(Reason.BAD_REQUEST, f"invalid send body: {e}") from None
            return await self.bus.send(who, params)
        if path.startswith("/api/inbox/"):
            _allow(method, b"GET")
            who = self.bus.authenticate(_bearer(request))
            query: dict[str, Any] = dict(parse_qsl(url.query, keep_blank_values=True))
            query["agent"] = unquote(path[len("/api/inbox/") :])
            try:
                inbox = msgspec.convert(query, InboxParams, strict=False)
            except msgspec.ValidationError as e:
                raise BusError(Reason.BAD_REQUEST, f"invalid inbox request: {e}") from None
            return await self.bus.inbox(who, inbox)
        raise BusError(Reason.NOT_FOUND, f"no such path: {path}")

    def _send(
        self,
        status: int,
        payload: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
        head: bool = False,
    ) -> None:
        """Hand one response to the socket (for HEAD, without its body)."""
        extra = b"".join(b"%s: %s\r\n" % h for h in headers or ())
        if close:
            extra += b"connection: close\r\n"
        self.io.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nserver: busd\r\n%s\r\n%s"
            % (status, PHRASES.get(status, b""), len(payload), extra, b"" if head else payload)
        )


class _Health(msgspec.Struct):
    service: str = "busd"
    version: str = __version__


def _allow(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise MethodNotAllowed(allowed.decode())


def _bearer(request: Request) -> str | None:
    value = request.header(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
