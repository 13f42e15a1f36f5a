"""The HTTP/1.1 shim (h11) for agents that only speak HTTP: POST /api/send,
GET /api/inbox/<agent>, GET /healthz. Keep-alive, bounded request sizes, and
deadlines on reading a request so a slow or idle client cannot hold on."""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
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


class HttpConnection:
    """One keep-alive connection, one request at a time: read it (within
    IDLE_TIMEOUT of the last response, then REQUEST_TIMEOUT from its first
    byte), answer it, hand the response to the socket, and read the next one
    only once the client has taken the last one."""

    def __init__(self, bus: Bus, stream: trio.SocketStream, cid: int) -> None:
        self.bus = bus
        self.stream = stream
        self.cid = cid
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX)
        cfg = bus.config
        self.max_request = max(1024 * 1024, cfg.max_body * 6 + 16 * 1024)  # JSON may escape 1 byte to 6
        self.io: SocketIO
        # for _watch: whether we wait for a request, since when, and why we stopped reading
        self._reading = True
        self._last_active = trio.current_time()  # the last response, or the connection's start
        self._begun: float | None = None  # the current request's first byte
        self._stop: str | None = None
        self._sleep: trio.CancelScope | None = None  # _watch's

    async def run(self, first: bytes) -> None:
        self.h11.receive_data(first)
        async with trio.open_nursery() as conn:
            self.io = SocketIO(self.stream, conn.cancel_scope, WRITE_TIMEOUT, self.cid)
            try:
                conn.start_soon(self.io.run_drain)
                conn.start_soon(self._watch)
                await self._serve()
                await self.io.flushed()
                conn.cancel_scope.cancel()  # done: stop the drain task
            finally:
                self.io.close()

    async def _serve(self) -> None:
        while True:
            try:
                request, body = await self._read_request()
            except _Closed:
                return
            except TooLarge as e:
                self._send(413, error_body(Reason.TOO_LARGE, str(e)), close=True)
                return
            except h11.RemoteProtocolError as e:
                # h11's message may quote a header line, token and all: not echoed
                log.info("conn=%d bad HTTP request (%d)", self.cid, e.error_status_hint)
                self._send(e.error_status_hint, error_body(Reason.BAD_REQUEST, "malformed HTTP request"), close=True)
                return
            except trio.TooSlowError:
                log.info("conn=%d HTTP request too slow; closing", self.cid)
                self._send(408, error_body(Reason.BAD_REQUEST, "request not received in time"), close=True)
                return
            self._reading = False
            status, payload, headers = await self._respond(request, body)
            self._reading = True
            self._last_active = trio.current_time()
            if not self._send(status, payload, headers):
                return
            if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
                return
            try:
                self.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return
            if self.io.backlog:
                await self.io.flushed()  # the client reads its response before we read on

    async def _read_request(self) -> tuple[h11.Request, bytes]:
        """The next request; _Closed at a clean end (EOF, or shutdown or
        idleness between requests), TooSlowError for a request begun but not
        finished in time (see _watch)."""
        request: h11.Request | None = None
        body = bytearray()
        if self.h11.trailing_data[0]:  # bytes of this request already here
            self._begun = trio.current_time()
        try:
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    data = self.io.recv_nowait()
                    if data is None:
                        if self._begun is not None and self._sleep is not None:
                            # a request that does not come in one piece: _watch
                            # must wake in time for its REQUEST_TIMEOUT
                            self._sleep.deadline = min(self._sleep.deadline, self._begun + REQUEST_TIMEOUT)
                        data = await self.io.recv()
                    if not data:
                        if self._stop == "slow":
                            raise trio.TooSlowError
                        if self._stop is not None or (self.h11.their_state is h11.IDLE and request is None):
                            raise _Closed  # idle, shutting down, or a clean close between requests
                    elif self._begun is None:
                        self._begun = trio.current_time()
                    self.h11.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                    length = _content_length(event)
                    if length is not None and length > self.max_request:
                        raise TooLarge(f"request body over {self.max_request} bytes")
                    if self.h11.they_are_waiting_for_100_continue:  # curl does, for bodies over 1 KiB
                        self.io.write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_request:
                        raise TooLarge(f"request body over {self.max_request} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    return request, bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise _Closed
        finally:
            self._begun = None

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

    async def _respond(self, request: h11.Request, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
        self.bus.requests += 1
        try:
            result = await self._route(request, body)
            return 200, ok_body(result), []
        except MethodNotAllowed as e:
            return 405, error_body(Reason.BAD_REQUEST, "method not allowed"), [("allow", e.allow)]
        except BusError as e:
            headers = []
            retry_after = e.data.get("retry_after", msgspec.UNSET)
            if retry_after is not msgspec.UNSET:
                headers.append(("retry-after", str(math.ceil(float(retry_after)))))  # type: ignore[arg-type]
            return HTTP_STATUS[e.reason], error_body(e.reason, e.message, retry_after), headers
        except Exception:
            log.exception("conn=%d %s %s failed", self.cid, request.method, request.target)
            return HTTP_STATUS[Reason.UNAVAILABLE], error_body(Reason.UNAVAILABLE, "internal error"), []

    async def _route(self, request: h11.Request, body: bytes) -> Any:
        url = urlsplit(request.target.decode("latin-1"))
        path = url.path
        method = request.method
        if path == "/healthz":
            _allow(method, b"GET")
            return _Health()
        if path == "/api/send":
            _allow(method, b"POST")
            who = self.bus.authenticate(_bearer(request))
            try:
                params: SendParams = send_decoder.decode(body)
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

    def _send(self, status: int, payload: bytes, headers: list[tuple[str, str]] | None = None, close: bool = False) -> bool:
        """Hand one response to the socket; False if the connection is done for."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.io.broken:
            return False
        hdrs = [("content-type", "application/json"), ("content-length", str(len(payload))), ("server", "busd")]
        hdrs += headers or []
        if close:
            hdrs.append(("connection", "close"))
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=hdrs, reason=HTTPStatus(status).phrase))
            data += self.h11.send(h11.Data(data=payload)) or b""
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return False
        self.io.write(data)
        return not close and not self.io.broken


class _Closed(Exception):
    pass


class TooLarge(Exception):
    pass


class _Health(msgspec.Struct):
    service: str = "busd"
    version: str = __version__


def _allow(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise MethodNotAllowed(allowed.decode())


def _bearer(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            return None
    return None


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
