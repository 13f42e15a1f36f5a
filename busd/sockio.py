"""Socket I/O for both transports, thinner than trio's streams.

Reads take what the kernel has without a trip through the scheduler and
wait (``wait_readable``) only when it has nothing. Writes go straight to the
kernel from whoever has a reply, which is often the writer's commit callback,
so an answer costs one ``send`` and no task switch. Only what the kernel
cannot take now is kept, in ``backlog``, for the drain task. A peer that does
not read its replies makes that backlog grow; a transport stops reading its
requests at OUT_MAX bytes, and the drain task drops the peer once its backlog
has not emptied for ``write_timeout`` seconds.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger(__name__)

RECV_SIZE = 65536
OUT_MAX = 4 * 1024 * 1024  # bytes of replies held for one peer before its requests wait


class Signal:
    """Wakes everyone waiting; costs nothing to fire when nobody is."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class SocketIO:
    """One connected socket. ``run_drain`` must run (in a task) while replies
    are written; it cancels ``scope`` if the peer stops reading or breaks."""

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope, write_timeout: float, cid: int) -> None:
        self.cid = cid
        self.sock = stream.socket
        self.fd = self.sock.fileno()
        self.scope = scope
        self.write_timeout = write_timeout
        self.backlog = bytearray()  # replies the kernel has not taken yet
        self.broken = False
        self.progress = Signal()  # fired when the backlog shrinks
        self._stuck = Signal()  # fired when the backlog stops being empty

    # -- reading -------------------------------------------------------------

    def recv_nowait(self) -> bytes | None:
        """Bytes the kernel has now (b"" at EOF), or None if it has none."""
        try:
            return os.read(self.fd, RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError:  # reset by the peer
            return b""

    async def recv(self) -> bytes:
        """The next bytes from the peer; b"" at EOF or if the connection broke.
        Waits first: call it once ``recv_nowait`` has come back empty."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            data = self.recv_nowait()
            if data is not None:
                return data

    def stop_reading(self) -> None:
        """From now on the reader gets what the peer has already sent, then
        EOF; a reader waiting now wakes up. Replies can still be written."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:  # the peer is gone already
            pass

    # -- writing -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Hand ``data`` to the kernel now, or keep it for the drain task.
        Never blocks; after the connection broke, drops it."""
        if self.broken:
            return
        if not self.backlog:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self._break()
                return
            if n == len(data):
                return
            data = data[n:]
            self._stuck.fire()
        self.backlog += data

    async def flushed(self) -> None:
        """Return once every reply is with the kernel (or the peer is gone)."""
        while self.backlog and not self.broken:
            await self.progress.wait()

    async def run_drain(self) -> None:
        """Write the backlog whenever the kernel has room; drop the peer if it
        does not empty in ``write_timeout`` seconds."""
        while True:
            while not self.backlog:
                await self._stuck.wait()
            with trio.move_on_after(self.write_timeout):
                while self.backlog:
                    await trio.lowlevel.wait_writable(self.sock)
                    try:
                        n = os.write(self.fd, self.backlog)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._break()
                        return
                    del self.backlog[:n]
                    self.progress.fire()
            if self.backlog:
                log.warning("conn=%d does not read its replies; dropping it", self.cid)
                self._break()
                return

    def close(self) -> None:
        """Write nothing more, before the socket closes (its descriptor
        number may soon belong to another connection)."""
        self.broken = True
        self.backlog.clear()
        self.progress.fire()

    def _break(self) -> None:
        self.broken = True
        self.backlog.clear()
        self.progress.fire()
        self.scope.cancel()
