"""The bus itself, free of any transport: names, auth, limits and long-polls.
JSON lines and HTTP both call these methods; no business rule lives anywhere
else.

``who`` is the caller's identity as the transport established it: None (not
authenticated), ADMIN (may act as anyone) or an agent name (may send only as
itself and read or ack only its own inbox).

Writes keep the order their requests were read in: ``submit_send`` and
``submit_ack`` return once the write is queued for the writer (a Pending to
await for the outcome), and ``inbox`` calls ``task_status.started()`` once its
ack is queued. A transport that waits for that before reading its next
request keeps pipelined writes in order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio
from msgspec import UNSET

from . import __version__, db
from .config import ADMIN, Config, Tokens
from .errors import BusError, Reason
from .ratelimit import Buckets
from .store import Pending, Store, Then
from .wire import (
    BROADCAST,
    AckParams,
    AckResult,
    AgentInfo,
    AgentsResult,
    InboxParams,
    InboxResult,
    Message,
    PingResult,
    SendParams,
    SendResult,
    StatsResult,
)

log = logging.getLogger(__name__)

TOUCH_EVERY = 10.0  # seconds between flushes of last-seen times
PURGE_EVERY = 3600.0  # seconds between retention sweeps
READ_GRACE = 0.25  # seconds connections may go on reading after shutdown begins


class Bus:
    def __init__(self, config: Config, store: Store, tokens: Tokens) -> None:
        self.config = config
        self.store = store
        self.tokens = tokens
        self._broadcasts = Buckets(config.broadcast_per_minute)
        self._directs = Buckets(config.direct_per_minute)
        self._seen_at: dict[str, float] = {}  # not yet written to the database
        self._started = time.time()
        self.closing = False
        self.closed = trio.Event()  # set by close()
        self.read_deadline = math.inf
        self.connections_open = 0
        self.connections_total = 0
        self.requests = 0

    # -- identity ------------------------------------------------------------

    def anonymous(self) -> str | None:
        """Who a caller is before presenting a token."""
        return None if self.tokens.required else ADMIN

    def authenticate(self, token: str | None) -> str:
        if not self.tokens.required:
            return ADMIN
        who = self.tokens.identify(token)
        if who is None:
            raise BusError(Reason.UNAUTHORIZED, "missing or wrong token")
        return who

    def _authorize(self, who: str | None, agent: str) -> None:
        if who is None:
            raise BusError(Reason.UNAUTHORIZED, "authenticate first (method 'auth')")
        if agent.upper() == BROADCAST:
            raise BusError(Reason.BAD_REQUEST, "ALL is reserved and names no agent")
        if who != ADMIN and who != agent:
            raise BusError(Reason.FORBIDDEN, f"this token acts as {who!r}, not {agent!r}")
        self._seen_at[agent] = time.time()

    # -- methods ---------------------------------------------------------------

    async def submit_send(self, who: str | None, p: SendParams, then: Then | None = None) -> Pending:
        """Check a send and queue it for the writer; its outcome, once
        committed, is a db.SendDone (see ``send_result``) or a BusError."""
        self._authorize(who, p.from_)
        if p.to != BROADCAST and p.to.upper() == BROADCAST:
            raise BusError(Reason.BAD_REQUEST, "to broadcast, send to 'ALL' in capitals")
        limit = self.config.max_body
        if len(p.body) > limit or (len(p.body) * 4 > limit and len(p.body.encode()) > limit):
            raise BusError(Reason.TOO_LARGE, f"body is over {limit} bytes")
        buckets = self._broadcasts if p.to == BROADCAST else self._directs
        wait = buckets.take(p.from_, trio.current_time())
        if wait and p.key is not None and await self.store.read(db.find_key, p.from_, p.key):
            wait = 0.0  # a retry of a stored send: the writer answers it as a duplicate
        if wait:
            wait = math.ceil(wait * 1000) / 1000
            kind = "broadcasts" if p.to == BROADCAST else "direct sends"
            raise BusError(Reason.RATE_LIMITED, f"too many {kind} from {p.from_!r}", retry_after=wait)
        return await self.store.submit(db.Send(p.from_, p.to, p.subject, p.body, p.reply_to, p.key), then)

    async def send(self, who: str | None, p: SendParams) -> SendResult:
        return send_result(await (await self.submit_send(who, p)).result())

    async def inbox(
        self,
        who: str | None,
        p: InboxParams,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
        room: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint,
    ) -> InboxResult:
        """Unread messages of ``p.agent``, after waiting up to ``p.wait`` for
        one. ``room`` is awaited right before each query, and the rows go back
        to the caller without another checkpoint: a transport's way to wait
        until it has room for the reply."""
        agent = p.agent
        self._authorize(who, agent)
        if p.ack:
            pending = await self.store.submit(db.Ack(agent, up_to=p.ack))
        elif not self.store.is_known(agent):
            pending = await self.store.submit(db.Touch({agent: db.timestamp()}))
        else:
            pending = None
        task_status.started()
        if pending is not None:
            await pending.result()
        rows = await self._wait_for_mail(agent, p.limit, p.wait, p.after, room)
        return InboxResult(agent, [_message(r) for r in rows])

    async def _wait_for_mail(
        self, agent: str, limit: int, wait: float, after: int, room: Callable[[], Awaitable[None]]
    ) -> list[db.InboxRow]:
        deadline = trio.current_time() + wait
        while True:
            with self.store.mailboxes.watch(agent) as arrived:  # before the read: no lost wake-up
                await room()
                rows = await self.store.read_inline(db.read_inbox, agent, limit, after)
                if rows or self.closing or trio.current_time() >= deadline:
                    return rows
                with trio.move_on_at(deadline) as waiting:
                    await arrived.wait()
                if waiting.cancelled_caught:
                    return []  # nothing committed for this inbox while we waited

    async def submit_ack(self, who: str | None, p: AckParams, then: Then | None = None) -> Pending:
        """Check an ack and queue it; its outcome is the count newly read."""
        self._authorize(who, p.agent)
        if p.up_to is None and p.ids is None:
            raise BusError(Reason.BAD_REQUEST, "give up_to or ids")
        return await self.store.submit(db.Ack(p.agent, up_to=p.up_to, ids=p.ids), then)

    async def ack(self, who: str | None, p: AckParams) -> AckResult:
        return AckResult(await (await self.submit_ack(who, p)).result())

    async def agents(self, who: str | None) -> AgentsResult:
        self._check_authenticated(who)
        rows = await self.store.read(db.list_agents)
        out = []
        for name, last_seen, unread in rows:
            recent = self._seen_at.get(name)
            if recent is not None:
                last_seen = max(last_seen or "", db.timestamp(recent))
            out.append(AgentInfo(name, last_seen, unread))
        return AgentsResult(out)

    async def stats(self, who: str | None) -> StatsResult:
        self._check_authenticated(who)
        agents, unread, last_id = await self.store.read(db.totals)
        return StatsResult(
            version=__version__,
            uptime_s=round(time.time() - self._started, 3),
            db=self.store.path,
            connections_open=self.connections_open,
            connections_total=self.connections_total,
            requests=self.requests,
            agents=agents,
            unread=unread,
            last_id=last_id,
            waiters=len(self.store.mailboxes),
            writer=self.store.statistics(),
        )

    async def ping(self, who: str | None) -> PingResult:
        self._check_authenticated(who)
        return PingResult(True, db.timestamp())

    def _check_authenticated(self, who: str | None) -> None:
        if who is None:
            raise BusError(Reason.UNAUTHORIZED, "authenticate first (method 'auth')")

    # -- life cycle ------------------------------------------------------------

    def close(self) -> None:
        """At shutdown: answer every long-poll now. Transports watch
        ``closed`` and stop reading at ``read_deadline``, READ_GRACE seconds
        later: bytes a client has already sent are still read and answered,
        idle connections end."""
        self.read_deadline = trio.current_time() + READ_GRACE
        self.closing = True
        self.closed.set()
        self.store.mailboxes.wake_all()

    async def run_maintenance(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush last-seen times, sweep old read messages, forget idle buckets."""
        task_status.started()
        next_purge = trio.current_time()
        while True:
            now = trio.current_time()
            try:
                if now >= next_purge:
                    await self.purge()
                    next_purge = now + PURGE_EVERY
                await self.flush_seen()
            except BusError as e:  # e.g. a full disk: the next tick tries again
                log.warning("maintenance postponed: %s", e.message)
            self._broadcasts.forget_full(now)
            self._directs.forget_full(now)
            await trio.sleep(TOUCH_EVERY)

    async def flush_seen(self) -> None:
        """Write last-seen times (of agents already in the agents table)."""
        if not self._seen_at:
            return
        seen, self._seen_at = self._seen_at, {}
        try:
            await self.store.execute(db.Seen({a: db.timestamp(t) for a, t in seen.items()}))
        except BusError:
            for agent, t in seen.items():  # keep them for the next try
                self._seen_at[agent] = max(t, self._seen_at.get(agent, t))
            raise

    async def purge(self) -> int:
        cutoff = db.timestamp(time.time() - self.config.retention_days * 86400)
        total = 0
        while True:
            n = await self.store.execute(db.Purge(cutoff))
            total += n
            if n < db.PURGE_LIMIT:
                break
        if total:
            log.info("retention: deleted %d read inbox entries older than %s", total, cutoff)
        return total


def send_result(done: db.SendDone) -> SendResult:
    return SendResult(done.id, done.timestamp, done.recipients, True if done.duplicate else UNSET)


def _message(r: db.InboxRow) -> Message:
    mid, sender, to, subject, body, ts, reply_to = r
    if reply_to is None:
        return Message(mid, sender, to, subject, body, ts)
    return Message(mid, sender, to, subject, body, ts, reply_to)
