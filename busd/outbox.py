"""The client's offline outbox: sends the bus has not confirmed, kept in one
local SQLite file until they are delivered.

Rows are delivered in rowid order (the order they were queued), each with the
idempotency key it was queued with, so delivering a row twice (a crash
between the bus's reply and the row's removal, or two processes flushing the
same file) still stores it once. Every ``put`` is committed with fsync before
it returns: a message reported as queued survives the agent's own crash.

Sync and thread-safe; the async client calls it through ``trio.to_thread``.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import threading
from pathlib import Path

from msgspec import Struct, field

from .wire import SendParams, encoder, send_decoder

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,      -- queue order
    bus        TEXT NOT NULL,            -- host:port the message is for
    sender     TEXT NOT NULL,
    key        TEXT NOT NULL,            -- idempotency key, sent on every try
    params     BLOB NOT NULL,            -- the send's params, as on the wire
    queued_at  TEXT NOT NULL,
    error      TEXT,                     -- set when the bus refused it for good
    UNIQUE (bus, sender, key)
);
"""


class Entry(Struct, kw_only=True, omit_defaults=True):
    """One queued message, as ``busd outbox`` lists it."""

    seq: int
    bus: str
    key: str
    from_: str = field(name="from")
    to: str
    subject: str
    body: str
    reply_to: int | None = None
    queued_at: str
    error: str | None = None  # "reason: message" once the bus refused it for good

    @property
    def params(self) -> SendParams:
        return SendParams(
            from_=self.from_, to=self.to, body=self.body, subject=self.subject, key=self.key, reply_to=self.reply_to
        )


def default_path() -> str:
    """``$BUSD_OUTBOX``, else ``$XDG_STATE_HOME/busd/outbox.db`` (XDG's
    default state home is ``~/.local/state``)."""
    explicit = os.environ.get("BUSD_OUTBOX")
    if explicit:
        return explicit
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "busd", "outbox.db")


class Outbox:
    """The outbox file at ``path``. Nothing is created on disk until the first
    ``put``; reading a file that does not exist yet finds it empty."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Outbox({self.path!r})"

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._conn is None:
            if not create and not os.path.exists(self.path):
                return None
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(SCHEMA)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def put(self, bus: str, params: SendParams) -> int:
        """Queue one send (its ``key`` must be set); durable on return. The
        same bus, sender and key queued twice is one row. Returns its seq."""
        assert params.key is not None
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._lock:
            conn = self._open(create=True)
            assert conn is not None
            conn.execute(
                "INSERT INTO outbox (bus, sender, key, params, queued_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (bus, sender, key) DO NOTHING",
                (bus, params.from_, params.key, encoder.encode(params), now),
            )
            row = conn.execute(
                "SELECT seq FROM outbox WHERE bus = ? AND sender = ? AND key = ?", (bus, params.from_, params.key)
            ).fetchone()
            return int(row[0])

    def pending(self, bus: str) -> list[Entry]:
        """Messages for ``bus`` still to deliver, oldest first."""
        return self._select("WHERE bus = ? AND error IS NULL", (bus,))

    def entries(self) -> list[Entry]:
        """Everything in the file, every bus, failed ones too, oldest first."""
        return self._select("", ())

    def senders(self, bus: str) -> set[str]:
        """Senders with messages for ``bus`` still to deliver."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return set()
            rows = conn.execute("SELECT DISTINCT sender FROM outbox WHERE bus = ? AND error IS NULL", (bus,))
            return {r[0] for r in rows}

    def remove(self, seq: int) -> None:
        """Forget a delivered message."""
        with self._lock:
            conn = self._open(create=False)
            if conn is not None:
                conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def fail(self, seq: int, error: str) -> None:
        """Keep a message the bus refused for good, out of the delivery queue."""
        with self._lock:
            conn = self._open(create=False)
            if conn is not None:
                conn.execute("UPDATE outbox SET error = ? WHERE seq = ?", (error, seq))

    def _select(self, where: str, args: tuple[object, ...]) -> list[Entry]:
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            rows = conn.execute(
                f"SELECT seq, bus, params, queued_at, error FROM outbox {where} ORDER BY seq", args
            ).fetchall()
        out = []
        for seq, bus, raw, queued_at, error in rows:
            p = send_decoder.decode(raw)
            out.append(
                Entry(
                    seq=seq,
                    bus=bus,
                    key=p.key or "",
                    from_=p.from_,
                    to=p.to,
                    subject=p.subject,
                    body=p.body,
                    reply_to=p.reply_to,
                    queued_at=queued_at,
                    error=error,
                )
            )
        return out

