"""The native transport: JSON-RPC 2.0, one object per line.

Per connection, one reader task decodes lines in order. A write (send, ack)
is checked and queued for the writer before the next line is read, so
pipelined sends commit in the order they were written; the writer hands its
outcome back right after the commit (no task per write). Reads (inbox,
long-polls, agents, stats, ping) run in tasks of their own, so their replies
may come back out of order. Replies go to the socket as soon as they exist
(``sockio``): no task switch per reply.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
import trio

from .core import Bus, send_result
from .errors import BusError, Reason
from .framing import MAX_LINE, LineBuffer, LineTooLong
from .sockio import OUT_MAX, Signal, SocketIO
from .store import Pending, Then
from .wire import (
    DECODE_ERRORS,
    PARAMS_DECODERS,
    AckResult,
    AuthParams,
    ErrorObject,
    ErrorResponse,
    OkResult,
    Request,
    RequestId,
    Response,
    any_decoder,
    encoder,
    request_decoder,
)

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

# The contract's reasons as JSON-RPC error codes; ``data.reason`` names them too.
CODES: dict[Reason, int] = {
    Reason.BAD_REQUEST: INVALID_PARAMS,
    Reason.UNAUTHORIZED: -32001,
    Reason.FORBIDDEN: -32003,
    Reason.NOT_FOUND: -32004,
    Reason.TOO_LARGE: -32013,
    Reason.RATE_LIMITED: -32029,
    Reason.INBOX_FULL: -32007,
    Reason.UNAVAILABLE: -32053,
}

MAX_INFLIGHT = 256  # requests of one connection read but not yet answered
WRITE_TIMEOUT = 30.0  # a client that leaves its replies unread for this long is dropped
IDLE_TIMEOUT = 900.0  # a connection with nothing in flight and nothing said is closed
LINE_TIMEOUT = 60.0  # from a line's first byte to its newline


def error_line(rid: RequestId, code: int, reason: Reason, message: str, **data: Any) -> bytes:
    reply = ErrorResponse("2.0", rid, ErrorObject(code, message, {"reason": reason.value, **data}))
    return encoder.encode(reply) + b"\n"


class _Once:
    """A task_status that may be told ``started`` more than once."""

    __slots__ = ("_status", "_done")

    def __init__(self, status: trio.TaskStatus[None]) -> None:
        self._status = status
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._status.started()


class JsonLinesConnection:
    """One JSON-lines connection: a reader task, a task per read request, and
    the socket's drain task. A request counts as unanswered from the moment it
    is read until its reply is handed to the socket; the reader stops reading
    while MAX_INFLIGHT are unanswered or OUT_MAX bytes of replies wait for a
    client that does not read them, and inbox reads wait for that room before
    they query, which bounds what one client can make us hold."""

    def __init__(self, bus: Bus, stream: trio.SocketStream, cid: int) -> None:
        self.bus = bus
        self.stream = stream
        self.cid = cid
        self.who = bus.anonymous()
        self._unanswered = 0
        self._answered = Signal()  # fired when a reply is handed over
        self._last_active = trio.current_time()  # a request read or a reply sent
        self._line_begun: float | None = None  # when the unfinished line we hold began
        self._too_slow = False  # _watch cut an unfinished line
        self._sleep: trio.CancelScope | None = None  # _watch's
        self.io: SocketIO

    async def run(self, first: bytes) -> None:
        async with trio.open_nursery() as conn:
            self.io = io = SocketIO(self.stream, conn.cancel_scope, WRITE_TIMEOUT, self.cid)
            try:
                conn.start_soon(io.run_drain)
                conn.start_soon(self._watch)
                async with trio.open_nursery() as requests:
                    if not await self._read_loop(first, requests):
                        conn.cancel_scope.cancel()  # the peer is gone: drop everything
                        return
                while self._unanswered:  # writes still with the writer
                    await self._answered.wait()
                await io.flushed()
                conn.cancel_scope.cancel()  # done: stop the drain task
            finally:
                io.close()  # replies that come later (from the writer) go nowhere

    async def _read_loop(self, data: bytes, requests: trio.Nursery) -> bool:
        """Read and start requests until EOF, idleness or shutdown (True), or
        until the peer is gone (False)."""
        lines = LineBuffer(MAX_LINE)
        io = self.io
        while True:
            try:
                batch = lines.feed(data)
            except LineTooLong:
                log.warning("conn=%d line over %d bytes; closing", self.cid, MAX_LINE)
                self._unanswered += 1
                self._reply(error_line(None, INVALID_REQUEST, Reason.TOO_LARGE, "line over 1 MiB"))
                return True
            if not lines.pending:
                self._line_begun = None
            elif self._line_begun is None or batch:
                self._line_begun = trio.current_time()
                if self._sleep is not None:  # _watch must wake in time for LINE_TIMEOUT
                    self._sleep.deadline = min(self._sleep.deadline, self._line_begun + LINE_TIMEOUT)
            for line in batch:
                while self._unanswered >= MAX_INFLIGHT or len(io.backlog) >= OUT_MAX:
                    await self._wait_for_room()
                await self._handle_line(line, requests)
            if io.broken:
                return False
            ready = io.recv_nowait()
            if ready is not None:
                data = ready
                await trio.lowlevel.checkpoint()  # the client keeps us busy: let others run
            else:
                data = await io.recv()
            self._last_active = trio.current_time()
            if not data:  # EOF, or _watch stopped the reading
                if self._too_slow:
                    self._unanswered += 1
                    message = f"line not received within {LINE_TIMEOUT:g} s of its first byte"
                    self._reply(error_line(None, INVALID_REQUEST, Reason.BAD_REQUEST, message))
                return not io.broken  # answer what is in flight, then close

    async def _watch(self) -> None:
        """End the reading once the connection has been idle (nothing in
        flight, nothing said) for IDLE_TIMEOUT, once a line has taken
        LINE_TIMEOUT since its first byte (answered with an error), or
        READ_GRACE after shutdown begins: by shutting the socket's read side,
        so the reader still gets what the client has sent, then EOF. (One
        sleeping task per connection instead of a timer on every read.)"""
        bus = self.bus
        while not bus.closing:
            now = trio.current_time()
            deadline = self._last_active + IDLE_TIMEOUT
            if deadline <= now:  # a request is still in flight: look again later
                deadline = now + IDLE_TIMEOUT
            if self._line_begun is not None:
                deadline = min(deadline, self._line_begun + LINE_TIMEOUT)
            with trio.move_on_at(max(deadline, now)) as self._sleep:
                await bus.closed.wait()
            now = trio.current_time()
            if bus.closing:
                continue
            if self._line_begun is not None and now >= self._line_begun + LINE_TIMEOUT:
                log.info("conn=%d line not finished in %.0fs; closing", self.cid, LINE_TIMEOUT)
                self._too_slow = True
                break
            if not self._unanswered and now >= self._last_active + IDLE_TIMEOUT:
                log.info("conn=%d idle for %.0fs; closing", self.cid, IDLE_TIMEOUT)
                break
        else:
            await trio.sleep_until(bus.read_deadline)
        self.io.stop_reading()

    async def _wait_for_room(self) -> None:
        if self._unanswered >= MAX_INFLIGHT:
            await self._answered.wait()
        else:
            await self.io.progress.wait()

    async def _room(self) -> None:
        """Awaited by inbox reads right before they query: the rows they read
        are encoded and handed over at once, so at most one reply overshoots
        OUT_MAX."""
        await trio.lowlevel.checkpoint()
        while len(self.io.backlog) >= OUT_MAX and not self.io.broken:
            await self.io.progress.wait()

    async def _handle_line(self, line: bytes, requests: trio.Nursery) -> None:
        line = line.strip()
        if not line:
            return
        self._unanswered += 1
        self.bus.requests += 1
        try:
            req, params = decode_request(line)
        except InvalidRequest as e:
            self._reply(error_line(e.rid, e.code, Reason.BAD_REQUEST, e.message))
            return
        if isinstance(params, AuthParams):  # in line: later requests depend on it
            try:
                self.who = self.bus.authenticate(params.token)
            except BusError as e:
                self._reply(error_line(req.id, CODES[e.reason], e.reason, e.message))
                return
            self._reply(_result_line(req.id, OkResult()))
            return
        if req.method in WRITES:
            # Queued for the writer before the next line is read; the writer
            # hands the outcome to _deliver right after the commit.
            try:
                await WRITES[req.method](self.bus, self.who, params, partial(self._deliver, req.id, req.method))
            except BusError as e:
                self._reply(error_line(req.id, CODES[e.reason], e.reason, e.message, **e.data))
            return
        if req.method == "inbox":  # its ack, if any, is queued before we go on
            await requests.start(self._call, req.id, req.method, params)
        else:
            requests.start_soon(self._call, req.id, req.method, params)

    def _deliver(self, rid: RequestId, method: str, outcome: Any) -> None:
        if isinstance(outcome, BusError):
            self._reply(error_line(rid, CODES[outcome.reason], outcome.reason, outcome.message, **outcome.data))
        else:
            self._reply(_result_line(rid, RENDER[method](outcome)))

    async def _call(
        self, rid: RequestId, method: str, params: Any, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        once = _Once(task_status)
        try:
            if method == "inbox":
                result = await self.bus.inbox(self.who, params, task_status=once, room=self._room)
            else:
                once.started()
                result = await getattr(self.bus, method)(self.who)
            line = _result_line(rid, result)
        except BusError as e:
            line = error_line(rid, CODES[e.reason], e.reason, e.message, **e.data)
        except Exception:
            log.exception("conn=%d %s failed", self.cid, method)
            line = error_line(rid, CODES[Reason.UNAVAILABLE], Reason.UNAVAILABLE, "internal error")
        finally:
            once.started()
        self._reply(line)

    def _reply(self, line: bytes) -> None:
        """Hand one request's reply to the socket (never blocks)."""
        self.io.write(line)
        self._last_active = trio.current_time()
        self._unanswered -= 1
        self._answered.fire()


WRITES: dict[str, Callable[[Bus, str | None, Any, Then], Awaitable[Pending]]] = {
    "send": Bus.submit_send,
    "ack": Bus.submit_ack,
}
RENDER: dict[str, Callable[[Any], Any]] = {"send": send_result, "ack": AckResult}


def _result_line(rid: RequestId, result: Any) -> bytes:
    return encoder.encode(Response("2.0", rid, result)) + b"\n"


class InvalidRequest(Exception):
    def __init__(self, rid: RequestId, code: int, message: str) -> None:
        self.rid = rid
        self.code = code
        self.message = message




def decode_request(line: bytes) -> tuple[Request, Any]:
    """The request and its params Struct, or InvalidRequest with the JSON-RPC
    code: parse error, invalid request, unknown method or invalid params."""
    try:
        req = request_decoder.decode(line)
    except msgspec.ValidationError as e:
        # msgspec checks the shape while it parses: is it JSON at all?
        try:
            obj = any_decoder.decode(line)
        except DECODE_ERRORS as bad:
            raise InvalidRequest(None, PARSE_ERROR, f"parse error: {bad}") from None
        raise InvalidRequest(_id_of(obj), INVALID_REQUEST, f"invalid request: {e}") from None
    except DECODE_ERRORS as e:
        raise InvalidRequest(None, PARSE_ERROR, f"parse error: {e}") from None
    decoder = PARAMS_DECODERS.get(req.method)
    if decoder is None:
        raise InvalidRequest(req.id, METHOD_NOT_FOUND, f"unknown method {req.method!r}")
    try:
        return req, decoder.decode(req.params or b"{}")
    except DECODE_ERRORS as e:
        raise InvalidRequest(req.id, INVALID_PARAMS, f"invalid params: {e}") from None


def _id_of(obj: Any) -> RequestId:
    """The id of a request that is valid JSON but not a valid request."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, (int, str)) and not isinstance(rid, bool):
            return rid
    return None
