"""The native transport: JSON-RPC 2.0, one object per line.

Per connection, one reader task decodes lines in order. A write (send, ack)
is checked and queued for the writer before the next line is read, so
pipelined sends commit in the order they were written; its reply is queued at
once as an ``_Awaiting`` that the sender task renders when the commit resolves
it (no task per write). Reads (inbox, long-polls, agents, stats, ping) run in
tasks of their own, so their replies may come back out of order. One sender
task owns the socket's write side and coalesces ready replies into one write.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from .core import Bus, send_result
from .errors import BusError, Reason
from .framing import MAX_LINE, LineBuffer, LineTooLong
from .store import Pending
from .wire import (
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

MAX_INFLIGHT = 256  # requests of one connection awaiting their reply
OUTBOX = 256  # replies (or writes awaiting their commit) queued for the socket
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
    def __init__(self, bus: Bus, stream: trio.abc.Stream, cid: int) -> None:
        self.bus = bus
        self.stream = stream
        self.cid = cid
        self.who = bus.anonymous()
        self._inflight = trio.Semaphore(MAX_INFLIGHT)
        self._out: trio.MemorySendChannel[bytes | _Awaiting] | None = None

    async def run(self, first: bytes) -> None:
        out, out_recv = trio.open_memory_channel[bytes | _Awaiting](OUTBOX)
        async with trio.open_nursery() as conn:
            conn.start_soon(self._send_loop, out_recv, conn.cancel_scope)
            async with out:
                self._out = out
                async with trio.open_nursery() as requests:
                    await self._read_loop(first, requests)
                # every request has been answered; closing ``out`` lets the
                # sender flush and finish

    async def _read_loop(self, data: bytes, requests: trio.Nursery) -> None:
        lines = LineBuffer(MAX_LINE)
        while True:
            try:
                batch = lines.feed(data)
            except LineTooLong:
                log.warning("conn=%d line over %d bytes; closing", self.cid, MAX_LINE)
                await self._reply(error_line(None, INVALID_REQUEST, Reason.TOO_LARGE, "line over 1 MiB"))
                return
            for line in batch:
                await self._handle_line(line, requests)
            data = b""
            while not data:
                with self.bus.reading() as reading, trio.move_on_after(IDLE_TIMEOUT) as idle:
                    try:
                        data = await self.stream.receive_some(RECV_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        requests.cancel_scope.cancel()  # the peer is gone: drop its requests
                        return
                if reading.cancelled_caught:
                    return  # shutting down: answer what is in flight, then close
                if not idle.cancelled_caught:
                    if not data:
                        return  # EOF: answer what is in flight, then close
                elif self._inflight.value == MAX_INFLIGHT:
                    log.info("conn=%d idle for %.0fs; closing", self.cid, IDLE_TIMEOUT)
                    return

    async def _handle_line(self, line: bytes, requests: trio.Nursery) -> None:
        line = line.strip()
        if not line:
            return
        self.bus.requests += 1
        try:
            req, params = decode_request(line)
        except InvalidRequest as e:
            await self._reply(error_line(e.rid, e.code, Reason.BAD_REQUEST, e.message))
            return
        if isinstance(params, AuthParams):  # in line: later requests depend on it
            try:
                self.who = self.bus.authenticate(params.token)
            except BusError as e:
                await self._reply(error_line(req.id, CODES[e.reason], e.reason, e.message))
                return
            await self._reply(_result_line(req.id, OkResult()))
            return
        if req.method in WRITES:
            # Queued for the writer before the next line is read; the reply
            # is rendered by the sender task once the commit resolves it.
            try:
                pending = await WRITES[req.method](self.bus, self.who, params)
            except BusError as e:
                await self._reply(error_line(req.id, CODES[e.reason], e.reason, e.message, **e.data))
                return
            await self._reply(_Awaiting(req.id, pending, RENDER[req.method]))
            return
        await self._inflight.acquire()
        if req.method == "inbox":  # its ack, if any, is queued before we go on
            await requests.start(self._call, req.id, req.method, params)
        else:
            requests.start_soon(self._call, req.id, req.method, params)

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
            self._inflight.release()
        await self._reply(line)

    async def _reply(self, item: bytes | _Awaiting) -> None:
        assert self._out is not None
        await self._out.send(item)

    async def _send_loop(self, out: trio.MemoryReceiveChannel[bytes | _Awaiting], scope: trio.CancelScope) -> None:
        """Write replies in the order they were queued, coalescing those that
        are ready into one write; a reply awaiting its commit waits here."""
        held: bytes | _Awaiting | None = None
        try:
            while True:
                if held is None:
                    try:
                        held = await out.receive()
                    except trio.EndOfChannel:
                        return
                chunks = [await _render(held)]
                held = None
                while True:
                    try:
                        item = out.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if isinstance(item, _Awaiting) and not item.pending.done.is_set():
                        held = item
                        break
                    chunks.append(await _render(item))
                with trio.fail_after(WRITE_TIMEOUT):
                    await self.stream.send_all(b"".join(chunks))
        except trio.TooSlowError:
            log.warning("conn=%d does not read its replies; dropping it", self.cid)
            scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()


class _Awaiting:
    """A reply that is due once the writer resolves ``pending``."""

    __slots__ = ("rid", "pending", "render")

    def __init__(self, rid: RequestId, pending: Pending, render: Callable[[Any], Any]) -> None:
        self.rid = rid
        self.pending = pending
        self.render = render


async def _render(item: bytes | _Awaiting) -> bytes:
    if isinstance(item, bytes):
        return item
    try:
        return _result_line(item.rid, item.render(await item.pending.result()))
    except BusError as e:
        return error_line(item.rid, CODES[e.reason], e.reason, e.message, **e.data)


WRITES: dict[str, Callable[[Bus, str | None, Any], Awaitable[Pending]]] = {
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


BAD_BYTES = (msgspec.DecodeError, UnicodeDecodeError)  # msgspec lets invalid UTF-8 through as the latter


def decode_request(line: bytes) -> tuple[Request, Any]:
    """The request and its params Struct, or InvalidRequest with the JSON-RPC
    code: parse error, invalid request, unknown method or invalid params."""
    try:
        req = request_decoder.decode(line)
    except msgspec.ValidationError as e:
        # msgspec checks the shape while it parses: is it JSON at all?
        try:
            obj = any_decoder.decode(line)
        except BAD_BYTES as bad:
            raise InvalidRequest(None, PARSE_ERROR, f"parse error: {bad}") from None
        raise InvalidRequest(_id_of(obj), INVALID_REQUEST, f"invalid request: {e}") from None
    except BAD_BYTES as e:
        raise InvalidRequest(None, PARSE_ERROR, f"parse error: {e}") from None
    decoder = PARAMS_DECODERS.get(req.method)
    if decoder is None:
        raise InvalidRequest(req.id, METHOD_NOT_FOUND, f"unknown method {req.method!r}")
    try:
        return req, decoder.decode(req.params or b"{}")
    except BAD_BYTES as e:
        raise InvalidRequest(req.id, INVALID_PARAMS, f"invalid params: {e}") from None


def _id_of(obj: Any) -> RequestId:
    """The id of a request that is valid JSON but not a valid request."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, (int, str)) and not isinstance(rid, bool):
            return rid
    return None
