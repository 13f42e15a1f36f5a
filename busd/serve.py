"""Accepting connections: a cap on how many, a per-connection id, and the
first-byte sniff that hands a connection to JSON lines or HTTP."""

from __future__ import annotations

import itertools
import logging
from functools import partial

import trio

from .core import Bus
from .http import HttpConnection
from .jsonl import JsonLinesConnection

log = logging.getLogger(__name__)

SNIFF_TIMEOUT = 75.0  # a connection that says nothing for this long is closed
JSONL_FIRST = frozenset(b"{ \t\r\n")


class Server:
    """Serves one or more listeners; every connection is a task in
    ``handlers``, apart from the listeners so shutdown can stop accepting
    first and let connections drain after."""

    def __init__(self, bus: Bus, max_connections: int) -> None:
        self.bus = bus
        self.max_connections = max_connections
        self._ids = itertools.count(1)

    async def serve(
        self,
        host: str,
        port: int,
        handlers: trio.Nursery,
        http_only: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        # listening already: connections that come before the accept loop wait in the backlog
        task_status.started(listeners[0].socket.getsockname()[1])
        handler = partial(self.handle, http_only=http_only)
        await trio.serve_listeners(handler, listeners, handler_nursery=handlers)

    async def handle(self, stream: trio.SocketStream, http_only: bool = False) -> None:
        bus = self.bus
        cid = next(self._ids)
        if bus.connections_open >= self.max_connections:
            log.warning("conn=%d refused: %d connections open", cid, bus.connections_open)
            await trio.aclose_forcefully(stream)
            return
        bus.connections_open += 1
        bus.connections_total += 1
        try:
            async with stream:
                first = b""
                with trio.move_on_after(SNIFF_TIMEOUT):
                    first = await stream.receive_some(65536)
                if not first:
                    return
                if http_only or first[0] not in JSONL_FIRST:
                    conn: HttpConnection | JsonLinesConnection = HttpConnection(bus, stream, cid)
                else:
                    conn = JsonLinesConnection(bus, stream, cid)
                log.debug("conn=%d %s", cid, type(conn).__name__)
                await conn.run(first)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # Never let one connection take down the server.
            log.exception("conn=%d failed", cid)
        finally:
            bus.connections_open -= 1
