"""The async face of the database: the one writer task (bounded channel ->
batch -> one transaction in a worker thread -> fsync'd commit -> wake the
callers), a small pool of read connections, and the long-poll wake-ups that
the writer fires right after each commit."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import trio

from . import db
from .errors import BusError, Reason
from .wire import BROADCAST, WriterStats

log = logging.getLogger(__name__)

T = TypeVar("T")

QUEUE_SIZE = 8192  # ops waiting for the writer; beyond this, submitters wait
BATCH_MAX = 2000  # ops in one transaction
READERS = 4


Then = Callable[[db.Outcome], None]


class Pending:
    """An op on its way through the writer. ``await result()`` for its
    committed outcome, or give ``then``: the writer calls it with the outcome
    right after the commit (it must not block)."""

    __slots__ = ("op", "outcome", "_then", "_done")

    def __init__(self, op: db.Op, then: Then | None = None) -> None:
        self.op = op
        self.outcome: db.Outcome | None = None
        self._then = then
        self._done: trio.Event | None = None

    def resolve(self, outcome: db.Outcome) -> None:
        self.outcome = outcome
        if self._then is not None:
            try:
                self._then(outcome)
            except Exception:  # a caller's bug must not stop the writer
                log.exception("writer: callback of %s failed", type(self.op).__name__)
        if self._done is not None:
            self._done.set()

    async def result(self) -> Any:
        if self.outcome is None:
            if self._done is None:
                self._done = trio.Event()
            await self._done.wait()
        if isinstance(self.outcome, BusError):
            raise self.outcome
        return self.outcome


class Mailboxes:
    """Wake-ups for long-polls, one event per agent being watched. Watch
    before reading the inbox; a commit that lands after the read sets the
    event. An agent's event is dropped when its last watcher leaves."""

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}
        self._watchers: dict[str, int] = {}

    @contextmanager
    def watch(self, agent: str) -> Iterator[trio.Event]:
        ev = self._events.get(agent)
        if ev is None:
            ev = self._events[agent] = trio.Event()
        self._watchers[agent] = self._watchers.get(agent, 0) + 1
        try:
            yield ev
        finally:
            left = self._watchers.pop(agent) - 1
            if left:
                self._watchers[agent] = left
            else:
                self._events.pop(agent, None)

    def wake(self, agent: str) -> None:
        ev = self._events.pop(agent, None)
        if ev is not None:
            ev.set()

    def wake_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()

    def __len__(self) -> int:
        """Long-polls in progress."""
        return sum(self._watchers.values())


class Store:
    def __init__(self, path: str, writer: db.Writer, send: trio.MemorySendChannel[Pending]) -> None:
        self.path = path
        self._writer = writer
        self._send = send
        self._readers: list[sqlite3.Connection] = []
        self._inline: sqlite3.Connection | None = None
        self._read_limiter = trio.CapacityLimiter(READERS)
        self._write_limiter = trio.CapacityLimiter(1)
        self.mailboxes = Mailboxes()
        self._writer_done = trio.Event()
        # statistics
        self._batches = 0
        self._ops = 0
        self._max_batch = 0
        self._commit_s_total = 0.0
        self._commit_s_last = 0.0

    # -- writes ------------------------------------------------------------

    async def submit(self, op: db.Op, then: Then | None = None) -> Pending:
        """Queue ``op`` for the writer, in the order of calls; wait only if the
        queue is full. The outcome comes to ``then``, or to ``pending.result()``."""
        pending = Pending(op, then)
        try:
            try:
                self._send.send_nowait(pending)  # the usual case: no trip through the scheduler
            except trio.WouldBlock:
                await self._send.send(pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise BusError(Reason.UNAVAILABLE, "the bus is shutting down") from None
        return pending

    async def execute(self, op: db.Op) -> Any:
        return await (await self.submit(op)).result()

    def is_known(self, agent: str) -> bool:
        # The writer thread adds to this set; a membership test is atomic.
        return agent in self._writer.known

    async def drain(self) -> None:
        """Refuse new writes, and return once everything queued is committed
        and its callers have their outcome."""
        await self._send.aclose()
        await self._writer_done.wait()

    async def run_writer(self, receive: trio.MemoryReceiveChannel[Pending]) -> None:
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except trio.EndOfChannel:
                    self._writer_done.set()
                    return
                while len(batch) < BATCH_MAX:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)

    async def _commit(self, batch: list[Pending]) -> None:
        writer = self._writer
        t0 = time.perf_counter()
        # The batch's statements run here, on the event loop's thread: they
        # need the GIL throughout, and a worker thread would have to win it
        # back from the event loop for every one of them. Only the commit,
        # which waits for the disk without the GIL, goes to a thread.
        outcomes = writer.stage([p.op for p in batch])
        elapsed = time.perf_counter() - t0
        if writer.conn.in_transaction:
            try:
                # Not abandoned on cancel: a commit in flight always finishes
                # and its callers always hear how it went.
                failed, commit_s = await trio.to_thread.run_sync(_timed, writer.commit, limiter=self._write_limiter)
                elapsed += commit_s
            except Exception as e:  # a bug
                log.exception("writer: commit of %d failed", len(batch))
                failed = BusError(Reason.UNAVAILABLE, f"write failed: {e}")
            if failed is not None:
                outcomes = [failed] * len(batch)
        self._batches += 1
        self._ops += len(batch)
        self._max_batch = max(self._max_batch, len(batch))
        self._commit_s_total += elapsed
        self._commit_s_last = elapsed
        wake_all = False
        for pending, outcome in zip(batch, outcomes):
            pending.resolve(outcome)
            op = pending.op
            if isinstance(op, db.Send) and isinstance(outcome, db.SendDone) and not outcome.duplicate:
                if op.to == BROADCAST:
                    wake_all = True
                else:
                    self.mailboxes.wake(op.to)
        if wake_all:
            self.mailboxes.wake_all()

    # -- reads -------------------------------------------------------------

    async def read_inline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a small indexed query ``fn(conn, *args)`` on the event loop's
        own thread, which costs far less than a hop to a worker thread. WAL
        readers do not wait for the writer; if SQLite is busy all the same
        (recovery, a checkpoint's edge), fall back to ``read``. The query runs
        before any checkpoint: a caller that must yield does so first."""
        if self._inline is None:
            self._inline = db.open_reader(self.path, busy_timeout=0.0)
        try:
            return fn(self._inline, *args)
        except sqlite3.OperationalError:
            return await self.read(fn, *args)
        except sqlite3.Error as e:
            raise BusError(Reason.UNAVAILABLE, f"database error: {e}") from None

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on a read-only connection in a thread."""
        async with self._read_limiter:
            conn = None
            try:
                conn = self._readers.pop() if self._readers else db.open_reader(self.path)
                result = await trio.to_thread.run_sync(fn, conn, *args)
            except BaseException as e:
                if conn is not None:
                    conn.close()
                if isinstance(e, sqlite3.Error):
                    raise BusError(Reason.UNAVAILABLE, f"database error: {e}") from None
                raise
            self._readers.append(conn)
            return result

    def statistics(self) -> WriterStats:
        return WriterStats(
            queued=self._send.statistics().current_buffer_used,
            batches=self._batches,
            ops=self._ops,
            max_batch=self._max_batch,
            mean_batch=round(self._ops / self._batches, 2) if self._batches else 0.0,
            commit_ms_last=round(self._commit_s_last * 1000, 3),
            commit_ms_mean=round(self._commit_s_total * 1000 / self._batches, 3) if self._batches else 0.0,
        )


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the seconds it took, measured in the worker thread."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


@asynccontextmanager
async def open_store(path: str, *, inbox_cap: int, strict: bool, synchronous: str = "FULL") -> AsyncIterator[Store]:
    """Open the database and run the writer task for the life of the block.
    On exit the queue is closed, the writer commits what is queued, and the
    connections close."""
    lock = await trio.to_thread.run_sync(db.lock_exclusive, path)
    try:
        conn = await trio.to_thread.run_sync(db.open_writer, path, synchronous)
    except BaseException:
        os.close(lock)
        raise
    writer = db.Writer(conn, inbox_cap=inbox_cap, strict=strict)
    send, receive = trio.open_memory_channel[Pending](QUEUE_SIZE)
    store = Store(path, writer, send)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run_writer, receive)
            try:
                yield store
            finally:
                store.mailboxes.wake_all()
                await send.aclose()
    finally:
        for r in store._readers:
            r.close()
        if store._inline is not None:
            store._inline.close()
        conn.close()
        os.close(lock)  # only now: closing it earlier could drop SQLite's own locks
