"""The trio client: ``busd.client.AsyncClient`` (import it from there). The
same API as the blocking ``Client``, awaited; the protocol, errors, backoff
and outbox logic are the shared pieces in ``busd.client``."""

from __future__ import annotations

import logging
from typing import Any

import trio
from msgspec import Struct

from .client import (
    MAX_IDLE,
    RECV_SIZE,
    Backoff,
    BusClientError,
    BusUnreachable,
    FlushReport,
    Reply,
    Sent,
    Session,
    _Attempts,
    _Base,
    _Flush,
    _about_the_message,
    _Lost,
    _sent,
)
from .outbox import Entry
from .wire import (
    AckResult,
    AgentInfo,
    AgentsResult,
    AuthParams,
    InboxResult,
    Message,
    NoParams,
    PingResult,
    SendParams,
    StatsResult,
)

__all__ = ["AsyncClient", "Backoff"]

log = logging.getLogger("busd.client")


# ---- the trio client --------------------------------------------------------


class _AsyncConn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.session = Session()

    async def roundtrip(self, method: str, params: Struct, timeout: float) -> Reply:
        rid, line = self.session.request(method, params)
        with trio.move_on_after(timeout):
            try:
                await self.stream.send_all(line)
                while (reply := self.session.take(rid)) is None:
                    data = await self.stream.receive_some(RECV_SIZE)
                    if not data:
                        raise _Lost("connection closed by the bus")
                    self.session.feed(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise _Lost(str(e) or type(e).__name__) from None
            return reply
        raise _Lost("no reply in time")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class AsyncClient(_Base):
    """The trio client: the same API as ``Client``, awaited. Concurrent calls
    from several tasks are fine (each uses its own connection, so a long poll
    never holds up a send). Use ``async with`` or call ``aclose()``."""

    def __init__(self, url: str | None = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self._idle: list[_AsyncConn] = []
        self._outbox_lock = trio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
        if self.outbox is not None:
            self.outbox.close()

    # -- the API ---------------------------------------------------------------

    async def send(
        self,
        to: str,
        body: str,
        *,
        subject: str = "",
        from_: str | None = None,
        reply_to: int | None = None,
        key: str | None = None,
    ) -> Sent:
        params = self._send_params(to, body, subject, from_, reply_to, key)
        assert params.key is not None
        await self._flush_first()
        async with self._outbox_lock:
            if self._waiting and params.from_ in self._waiting:
                return await self._queue(params)
        try:
            return _sent(params.key, await self._call("send", params))
        except BusClientError as e:
            e.key = params.key
            if not self._queueable(e):
                raise
            async with self._outbox_lock:
                return await self._queue(params, e)

    async def inbox(
        self, agent: str | None = None, *, wait: float = 0.0, limit: int = 100, ack: int = 0, after: int = 0
    ) -> list[Message]:
        params = self._inbox_params(agent, wait, limit, ack, after)
        await self._flush_first()
        result: InboxResult = await self._call("inbox", params, wait=wait)
        return result.messages

    async def ack(self, up_to: int | None = None, *, ids: list[int] | None = None, agent: str | None = None) -> int:
        params = self._ack_params(up_to, ids, agent)
        await self._flush_first()
        result: AckResult = await self._call("ack", params)
        return result.acked

    async def agents(self) -> list[AgentInfo]:
        await self._flush_first()
        result: AgentsResult = await self._call("agents", NoParams())
        return result.agents

    async def stats(self) -> StatsResult:
        await self._flush_first()
        result: StatsResult = await self._call("stats", NoParams())
        return result

    async def ping(self) -> PingResult:
        await self._flush_first()
        result: PingResult = await self._call("ping", NoParams())
        return result

    async def flush(self) -> FlushReport:
        async with self._outbox_lock:
            return await self._flush(once=False)

    async def queued(self) -> list[Entry]:
        if self.outbox is None:
            return []
        return await trio.to_thread.run_sync(self.outbox.pending, self.bus)

    # -- the outbox ------------------------------------------------------------

    async def _queue(self, params: SendParams, cause: BusClientError | None = None) -> Sent:
        assert self.outbox is not None and params.key is not None
        try:
            await trio.to_thread.run_sync(self.outbox.put, self.bus, params)
        except Exception as e:
            raise BusUnreachable(
                f"{cause or 'messages queued before it'}; and the outbox {self.outbox.path} failed: {e}", key=params.key
            ) from None
        if self._waiting is None:
            self._waiting = set()
        self._waiting.add(params.from_)
        log.info("queued %s -> %s (key %s) in %s: %s", params.from_, params.to, params.key, self.outbox.path, cause)
        return Sent(key=params.key, queued=True)

    async def _flush_first(self) -> None:
        if self.outbox is None or self._waiting == set():
            return
        async with self._outbox_lock:
            if self._waiting is None:
                self._waiting = await trio.to_thread.run_sync(self.outbox.senders, self.bus)
            if self._waiting:
                await self._flush(once=True)

    async def _flush(self, once: bool) -> FlushReport:
        if self.outbox is None:
            return FlushReport(delivered=[], failed=[], remaining=0, reached=True)
        run = _Flush(self.outbox, await trio.to_thread.run_sync(self.outbox.pending, self.bus))
        for e in run.entries:
            if e.from_ in run.blocked:
                continue
            try:
                r = await self._call("send", e.params, once=once)
            except BusUnreachable:
                run.reached = False
                break
            except BusClientError as err:
                if not _about_the_message(err):
                    raise
                await trio.to_thread.run_sync(run.refused, e, err)
                continue
            await trio.to_thread.run_sync(run.done, e, r)
        report, self._waiting = await trio.to_thread.run_sync(run.report, self.bus)
        return report

    # -- the connection pool and the retry loop --------------------------------

    async def _call(self, method: str, params: Struct, *, wait: float = 0.0, once: bool = False) -> Any:
        attempts = _Attempts(self.retry, self._rng, trio.current_time(), once)
        while True:
            conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._connect(attempts.connect_timeout(self.connect_timeout, trio.current_time()))
                reply = await conn.roundtrip(method, params, self.timeout + wait)
            except _Lost as e:
                if conn is not None:
                    await conn.aclose()
                if reused:
                    continue
                delay = attempts.next_delay(trio.current_time())
                if delay is None:
                    raise BusUnreachable(f"cannot reach the bus at {self.bus}: {e}") from None
                log.debug("bus at %s unreachable (%s); retrying in %.2fs", self.bus, e, delay)
                await trio.sleep(delay)
                continue
            except BaseException:
                if conn is not None:
                    await conn.aclose()
                raise
            if reply.id is None or len(self._idle) >= MAX_IDLE:
                await conn.aclose()
            else:
                self._idle.append(conn)
            return Session.result(method, reply)

    async def _connect(self, timeout: float) -> _AsyncConn:
        stream = None
        with trio.move_on_after(timeout):
            try:
                stream = await trio.open_tcp_stream(self.host, self.port)
            except OSError as e:
                raise _Lost(str(e) or type(e).__name__) from None
        if stream is None:
            raise _Lost(f"no connection within {timeout:g}s")
        conn = _AsyncConn(stream)
        if self.token is not None:
            try:
                Session.result("auth", await conn.roundtrip("auth", AuthParams(token=self.token), self.timeout))
            except BaseException:
                await conn.aclose()
                raise
        return conn
