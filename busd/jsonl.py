"""The native transport: JSON-RPC 2.0, one object per line.

Per connection, one reader task decodes lines in order. A write (send, ack)
is checked and queued for the writer before the next line is read, so
pipelined sends commit in the order they were written; the writer hands its
outcome back right after the commit (no task per write). Reads (inbox,
long-polls, agents, stats, ping) run in tasks of their own, so their replies
may come back out of order. One sender task owns the socket's write side and
coalesces the replies that are ready into one write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import msgspec
import trio

from .core import Bus, send_result
from .errors import BusError, Reason
from .framing import MAX_LINE, LineBuffer, LineTooLong
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

MAX_INFLIGHT = 256  # requests of one connection read but not yet answered on the socket
WRITE_TIMEOUT = 30.0  # a client that does not read its replies for this long is dropped
IDLE_TIMEOUT = 900.0  # a connection with nothing in flight and nothing said is closed
RECV_SIZE = 65536


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
    """One JSON-lines connection: a reader task and a sender task. Every
    request holds one of MAX_INFLIGHT permits from the moment it is read until
    its reply is written to the socket, which bounds what a client that never
    reads its replies can make us hold."""

    def __init__(self, bus: Bus, stream: trio.abc.Stream, cid: int) -> None:
        self.bus = bus
        self.stream = stream
        self.cid = cid
        self.who = bus.anonymous()
        self._inflight = trio.Semaphore(MAX_INFLIGHT)
        # unbounded, but never holds more than MAX_INFLIGHT replies (the permits)
        self._out, self._out_recv = trio.open_memory_channel[bytes](math.inf)

    async def run(self, first: bytes) -> None:
        async with trio.open_nursery() as conn:
            conn.start_soon(self._send_loop, conn.cancel_scope)
            async with self._out:
                async with trio.open_nursery() as requests:
                    if not await self._read_loop(first, requests):
                        conn.cancel_scope.cancel()  # the peer is gone: drop everything
                        return
                for _ in range(MAX_INFLIGHT):  # every permit back: every reply written
                    await self._inflight.acquire()
            # ``_out`` closed: the sender finishes

    async def _read_loop(self, data: bytes, requests: trio.Nursery) -> bool:
        """Read and start requests until EOF, idleness or shutdown (True), or
        until the peer is gone (False)."""
        lines = LineBuffer(MAX_LINE)
        while True:
            try:
                batch = lines.feed(data)
            except LineTooLong:
                log.warning("conn=%d line over %d bytes; closing", self.cid, MAX_LINE)
                await self._inflight.acquire()
                self._reply(error_line(None, INVALID_REQUEST, Reason.TOO_LARGE, "line over 1 MiB"))
                return True
            for line in batch:
                await self._handle_line(line, requests)
            data = b""
            while not data:
                with self.bus.reading(IDLE_TIMEOUT) as reading:
                    try:
                        data = await self.stream.receive_some(RECV_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return False
                if not reading.cancelled_caught:
                    if not data:
                        return True  # EOF: answer what is in flight, then close
                elif self.bus.closing:
                    return True  # shutting down: answer what is in flight, then close
                elif self._inflight.value == MAX_INFLIGHT:
                    log.info("conn=%d idle for %.0fs; closing", self.cid, IDLE_TIMEOUT)
                    return True

    async def _handle_line(self, line: bytes, requests: trio.Nursery) -> None:
        line = line.strip()
        if not line:
            return
        await self._inflight.acquire()
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
                result = await self.bus.inbox(self.who, params, task_status=once)
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
        """Hand a reply to the sender (never blocks: the permits bound the queue)."""
        try:
            self._out.send_nowait(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is gone

    async def _send_loop(self, scope: trio.CancelScope) -> None:
        """Write replies as they come, coalescing those ready into one write;
        each written reply returns its permit."""
        out = self._out_recv
        try:
            async for line in out:
                chunks = [line]
                while True:
                    try:
                        chunks.append(out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                with trio.CancelScope(deadline=trio.current_time() + WRITE_TIMEOUT) as writing:
                    await self.stream.send_all(b"".join(chunks))
                if writing.cancelled_caught:
                    log.warning("conn=%d does not read its replies; dropping it", self.cid)
                    scope.cancel()
                    return
                for _ in chunks:
                    self._inflight.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


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
