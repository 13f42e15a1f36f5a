"""SQLite, synchronously: schema and migrations, the one write connection with
its batch transaction, and the read queries. Knows nothing about trio.

Tables
  messages  one row per send (a broadcast is one row; ``recipient`` is 'ALL')
  inbox     one row per (message, recipient); ``read_at`` NULL while unread
  agents    every inbox owner; ``known`` = has sent, read or was configured
            (broadcast goes to known agents); ``unread`` is kept in step with
            inbox so the inbox cap costs one row lookup
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Union

from .errors import BusError, Reason
from .wire import BROADCAST

SCHEMA_VERSION = 1
PURGE_LIMIT = 2_000  # inbox rows deleted per retention op

# MIGRATIONS[n] takes a database from user_version n to n + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE messages (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after deletes
        sender     TEXT    NOT NULL,
        recipient  TEXT    NOT NULL,
        subject    TEXT    NOT NULL,
        body       TEXT    NOT NULL,
        reply_to   INTEGER,
        ts         TEXT    NOT NULL,
        key        TEXT,
        recipients INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX messages_key ON messages (sender, key) WHERE key IS NOT NULL;
    CREATE TABLE inbox (
        message_id INTEGER NOT NULL,
        agent      TEXT    NOT NULL,
        read_at    TEXT,
        PRIMARY KEY (message_id, agent)
    ) WITHOUT ROWID;
    CREATE INDEX inbox_unread ON inbox (agent, message_id) WHERE read_at IS NULL;
    CREATE INDEX inbox_read ON inbox (read_at) WHERE read_at IS NOT NULL;
    CREATE TABLE agents (
        name      TEXT    PRIMARY KEY,
        known     INTEGER NOT NULL DEFAULT 0,
        last_seen TEXT,
        unread    INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION


INSERT_MESSAGE = (
    "INSERT INTO messages (id, sender, recipient, subject, body, reply_to, ts, key, recipients) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class UnusableDatabase(Exception):
    """The database cannot be used: busy, foreign, or from a newer busd."""


def timestamp(t: float | None = None) -> str:
    """UTC, ISO 8601, milliseconds, trailing Z."""
    global _second
    if t is None:
        t = time.time()
    whole = int(t)
    us = round((t - whole) * 1e6)  # as datetime rounds, then cut to milliseconds
    if us == 1_000_000:
        whole, us = whole + 1, 0
    ms = us // 1000
    second, prefix = _second
    if whole != second:  # formatted once a second, not on every commit
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole))
        _second = (whole, prefix)
    return f"{prefix}{ms:03d}Z"


_second: tuple[int, str] = (-1, "")


# ---- connections ------------------------------------------------------------


def lock_exclusive(path: str) -> int:
    """Claim the database for this process: an flock held on the file until
    the returned descriptor is closed (after every SQLite connection to it).
    A second busd on the same file fails here, at start-up."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as e:
        raise UnusableDatabase(f"{path}: cannot open: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UnusableDatabase(f"{path}: another busd is using this database") from None
    return fd


def open_writer(path: str, synchronous: str = "FULL") -> sqlite3.Connection:
    """The one read-write connection: schema checked (before anything is
    written), WAL, fsync on every commit, schema brought up to date.
    Raises UnusableDatabase or sqlite3.Error."""
    if os.path.exists(path) and not os.access(path, os.W_OK, effective_ids=True):
        # before SQLite opens it: it would leave read-only -wal and -shm files
        raise UnusableDatabase(f"{path}: read-only (busd must be able to write it)")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 2000")
        version = check_schema(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise UnusableDatabase(f"{path}: cannot switch to WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        migrate(conn, version)
        # A real write now, so a read-only database fails at start-up rather
        # than at the first send.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


def check_schema(conn: sqlite3.Connection, path: str) -> int:
    """The database's schema version, if this busd can use it (reads only)."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UnusableDatabase(
            f"{path}: schema version {version} is newer than this busd understands ({SCHEMA_VERSION})"
        )
    if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise UnusableDatabase(f"{path}: not a busd database (it has tables but no busd schema version)")
    return version


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Apply MIGRATIONS[version:], each in its own transaction."""
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(MIGRATIONS[version]):
                conn.execute(stmt)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return [s for s in out if s]


def open_reader(path: str, busy_timeout: float = 2.0) -> sqlite3.Connection:
    uri = "file:" + os.path.abspath(path) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    return conn


# ---- write operations (applied only by the writer) --------------------------


@dataclass(slots=True)
class Send:
    sender: str
    to: str
    subject: str
    body: str
    reply_to: int | None
    key: str | None


@dataclass(slots=True)
class SendDone:
    id: int
    timestamp: str
    recipients: int
    duplicate: bool


@dataclass(slots=True)
class Ack:
    agent: str
    up_to: int | None = None
    ids: list[int] | None = None


@dataclass(slots=True)
class Touch:
    """Mark agents known and record when they were last seen (None: not seen,
    as for agents named in the configuration)."""

    seen: dict[str, str | None]


@dataclass(slots=True)
class Seen:
    """Record when agents were last seen; makes nobody known."""

    seen: dict[str, str]


@dataclass(slots=True)
class Purge:
    """Delete read messages read before ``cutoff``; at most ``limit`` inbox rows."""

    cutoff: str
    limit: int = PURGE_LIMIT


Op = Union[Send, Ack, Touch, Seen, Purge]
Outcome = Union[SendDone, int, BusError]


@dataclass
class Writer:
    """Owns the write connection. A batch is one transaction: ``stage`` then
    ``commit`` (or ``apply``, both). Only the writer task calls them, one at a
    time, though ``commit`` runs in a worker thread.

    Every op makes all its checks before its first write, so a refusal
    (duplicate key, full inbox, unknown agent) leaves nothing behind and fails
    alone, without a savepoint. ``known`` and ``_unread`` mirror the agents
    table for the writer's own checks; they are rebuilt if a batch fails."""

    conn: sqlite3.Connection
    inbox_cap: int
    strict: bool
    known: set[str] = field(default_factory=set)
    _unread: dict[str, int] = field(default_factory=dict)
    _next_id: int = 1
    # Direct sends of the batch not yet inserted: they go in with one
    # executemany per table when the batch (or a run of sends) ends.
    _messages: list[tuple[object, ...]] = field(default_factory=list)
    _inbox: list[tuple[int, str]] = field(default_factory=list)
    _new_unread: dict[str, int] = field(default_factory=dict)
    _keys: dict[tuple[str, str], SendDone] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._load_caches()

    def _load_caches(self) -> None:
        rows = self.conn.execute("SELECT name, known, unread FROM agents").fetchall()
        self.known = {name for name, known, _ in rows if known}
        self._unread = {name: unread for name, _, unread in rows}
        # Ids are handed out here (the only writer); AUTOINCREMENT's counter
        # keeps the highest id ever used, so no id is ever reused.
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        self._next_id = (row[0] if row else 0) + 1
        self._messages, self._inbox, self._new_unread, self._keys = [], [], {}, {}

    def apply(self, ops: list[Op]) -> list[Outcome]:
        """``stage`` and ``commit`` in one call."""
        outcomes = self.stage(ops)
        if self.conn.in_transaction:
            failed = self.commit()
            if failed is not None:
                return [failed] * len(ops)
        return outcomes

    def stage(self, ops: list[Op]) -> list[Outcome]:
        """Apply ``ops`` in one new transaction, left open for ``commit``:
        work in memory and SQLite's page cache, no fsync, so the writer runs
        it on the event loop's thread. If the database fails (I/O error, disk
        full) or anything else goes wrong, the transaction is rolled back and
        every op fails with ``unavailable``."""
        now = timestamp()
        c = self.conn
        outcomes: list[Outcome] = []
        try:
            c.execute("BEGIN IMMEDIATE")
            for op in ops:
                if not isinstance(op, Send) or op.to == BROADCAST:
                    self._insert_sends()  # in order: this op may read what they write
                try:
                    outcomes.append(self._apply_one(op, now))
                except BusError as e:
                    outcomes.append(e)
            self._insert_sends()
        except Exception as e:  # sqlite3.Error, or a bug: nothing of the batch is kept
            self._abort()
            return [BusError(Reason.UNAVAILABLE, f"database error: {e}")] * len(ops)
        return outcomes

    def commit(self) -> BusError | None:
        """Commit what ``stage`` applied, with fsync (the writer runs it in a
        worker thread). None once it is durable; otherwise the batch is rolled
        back and the error is what each of its ops gets."""
        try:
            self.conn.execute("COMMIT")
        except Exception as e:
            self._abort()
            return BusError(Reason.UNAVAILABLE, f"database error: {e}")
        return None

    def _abort(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self._load_caches()

    def _apply_one(self, op: Op, now: str) -> Outcome:
        if isinstance(op, Send):
            return self._send(op, now)
        if isinstance(op, Ack):
            self._make_known(op.agent, now)
            return self._ack(op, now)
        if isinstance(op, Touch):
            for name, seen in op.seen.items():
                self._make_known(name, seen, force=True)
            return len(op.seen)
        if isinstance(op, Seen):
            self.conn.executemany(
                "UPDATE agents SET last_seen = coalesce(max(last_seen, ?), ?) WHERE name = ?",
                [(t, t, name) for name, t in op.seen.items()],
            )
            return len(op.seen)
        if isinstance(op, Purge):
            return self._purge(op)
        raise TypeError(op)

    def _make_known(self, name: str, seen: str | None, force: bool = False) -> None:
        if name in self.known and not force:
            return
        self.conn.execute(
            "INSERT INTO agents (name, known, last_seen) VALUES (?, 1, ?) "
            "ON CONFLICT (name) DO UPDATE SET known = 1, "
            "last_seen = coalesce(max(last_seen, excluded.last_seen), last_seen, excluded.last_seen)",
            (name, seen),
        )
        self.known.add(name)
        self._unread.setdefault(name, 0)

    def _send(self, op: Send, now: str) -> SendDone:
        c = self.conn
        # -- checks: nothing is written before all of them pass
        if op.key is not None:
            staged = self._keys.get((op.sender, op.key))
            if staged is not None:
                return SendDone(staged.id, staged.timestamp, staged.recipients, True)
            row = c.execute(
                "SELECT id, ts, recipients FROM messages WHERE sender = ? AND key = ?", (op.sender, op.key)
            ).fetchone()
            if row is not None:
                return SendDone(row[0], row[1], row[2], True)
        if op.to == BROADCAST:
            recipients = [a for a in self.known if a != op.sender]
            full = [a for a in recipients if self._unread[a] >= self.inbox_cap]
            if full:
                raise BusError(Reason.INBOX_FULL, f"inbox of {full[0]!r} is full; the broadcast went to nobody")
        else:
            if self.strict and op.to not in self.known:
                raise BusError(Reason.NOT_FOUND, f"no agent named {op.to!r} (strict mode)")
            unread = self._unread.get(op.to, 0)
            if unread >= self.inbox_cap:
                raise BusError(Reason.INBOX_FULL, f"inbox of {op.to!r} is full ({unread} unread)")
            recipients = [op.to]
        # -- writes
        self._make_known(op.sender, now)
        mid = self._next_id
        self._next_id += 1
        row = (mid, op.sender, op.to, op.subject, op.body, op.reply_to, now, op.key, len(recipients))
        if op.to == BROADCAST:
            c.execute(INSERT_MESSAGE, row)
            c.executemany("INSERT INTO inbox (message_id, agent) VALUES (?, ?)", [(mid, a) for a in recipients])
            c.execute("UPDATE agents SET unread = unread + 1 WHERE known = 1 AND name <> ?", (op.sender,))
        else:  # inserted with the rest of the run of sends (_insert_sends)
            self._messages.append(row)
            self._inbox.append((mid, op.to))
            self._new_unread[op.to] = self._new_unread.get(op.to, 0) + 1
        for a in recipients:
            self._unread[a] = self._unread.get(a, 0) + 1
        done = SendDone(mid, now, len(recipients), False)
        if op.key is not None:
            self._keys[(op.sender, op.key)] = done
        return done

    def _insert_sends(self) -> None:
        """Insert the direct sends staged since the last call."""
        if not self._messages:
            self._keys.clear()
            return
        c = self.conn
        c.executemany(INSERT_MESSAGE, self._messages)
        c.executemany("INSERT INTO inbox (message_id, agent) VALUES (?, ?)", self._inbox)
        c.executemany(
            "INSERT INTO agents (name, unread) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET unread = unread + excluded.unread",
            self._new_unread.items(),
        )
        self._messages, self._inbox, self._new_unread, self._keys = [], [], {}, {}

    def _ack(self, op: Ack, now: str) -> int:
        c = self.conn
        n = 0
        if op.up_to:
            n += c.execute(
                "UPDATE inbox SET read_at = ? WHERE agent = ? AND read_at IS NULL AND message_id <= ?",
                (now, op.agent, op.up_to),
            ).rowcount
        if op.ids:
            n += c.execute(
                "UPDATE inbox SET read_at = ? WHERE agent = ? AND read_at IS NULL "
                "AND message_id IN (SELECT value FROM json_each(?))",
                (now, op.agent, json.dumps(op.ids)),
            ).rowcount
        if n:
            c.execute("UPDATE agents SET unread = unread - ? WHERE name = ?", (n, op.agent))
            self._unread[op.agent] -= n
        return n

    def _purge(self, op: Purge) -> int:
        c = self.conn
        rows = c.execute(
            "SELECT message_id, agent FROM inbox WHERE read_at IS NOT NULL AND read_at < ? LIMIT ?",
            (op.cutoff, op.limit),
        ).fetchall()
        if not rows:
            return 0
        c.executemany("DELETE FROM inbox WHERE message_id = ? AND agent = ?", rows)
        c.executemany(
            "DELETE FROM messages WHERE id = ? AND NOT EXISTS (SELECT 1 FROM inbox WHERE message_id = ?)",
            [(m, m) for m in sorted({r[0] for r in rows})],
        )
        return len(rows)


# ---- reads (any reader connection) ------------------------------------------

InboxRow = tuple[int, str, str, str, str, str, "int | None"]


def read_inbox(conn: sqlite3.Connection, agent: str, limit: int, after: int = 0) -> list[InboxRow]:
    """Unread messages of ``agent`` with ids above ``after``, oldest first."""
    return conn.execute(
        "SELECT m.id, m.sender, m.recipient, m.subject, m.body, m.ts, m.reply_to "
        "FROM inbox i JOIN messages m ON m.id = i.message_id "
        "WHERE i.agent = ? AND i.read_at IS NULL AND i.message_id > ? ORDER BY i.message_id LIMIT ?",
        (agent, after, limit),
    ).fetchall()


def find_key(conn: sqlite3.Connection, sender: str, key: str) -> bool:
    """Whether a send with this key is stored."""
    row = conn.execute("SELECT 1 FROM messages WHERE sender = ? AND key = ?", (sender, key)).fetchone()
    return row is not None


def list_agents(conn: sqlite3.Connection) -> list[tuple[str, str | None, int]]:
    return conn.execute("SELECT name, last_seen, unread FROM agents ORDER BY name").fetchall()


def totals(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(agents, unread messages, last id)"""
    agents, unread = conn.execute("SELECT count(*), coalesce(sum(unread), 0) FROM agents").fetchone()
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    return agents, unread, row[0] if row else 0
