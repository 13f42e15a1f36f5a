"""The client commands of ``busd``: send, inbox, tail, ack, agents, stats,
ping and outbox. Each is an argparse sub-parser plus a ``cmd_*`` function
that returns the exit code; they talk to the bus through ``client.Client``.

Environment: BUSD_URL (``host:port`` or ``http://host:port``, default
localhost:7700), BUSD_TOKEN, BUSD_AGENT (the default sender and inbox),
BUSD_OUTBOX (the outbox file).

Exit codes: 0 ok (a send queued in the outbox is ok too, and says so on
stderr), 2 usage, 3 bus unreachable (and no outbox to fall back on), 4 refused
by the bus (the reason on stderr). ``--json`` prints one JSON object per
result, or NDJSON (one object a line) for lists; on failure it prints
``{"error": {"reason", "message", "retry_after"?}}`` as well.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from .client import Backoff, BusClientError, BusUnreachable, Client
from .outbox import Entry
from .wire import AgentInfo, Message, StatsResult

OK, USAGE, UNREACHABLE, REFUSED = 0, 2, 3, 4
TAIL_WAIT = 30.0  # seconds of one long poll in ``busd tail``
TAIL_LIMIT = 1000


class UsageError(Exception):
    pass


# ---- parsers ----------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument("--url", metavar="URL", help="host:port or http://host:port (env BUSD_URL; default localhost:7700)")
    g.add_argument("--token", metavar="T", help="token for the bus (env BUSD_TOKEN, which keeps it out of ps)")
    g.add_argument("--json", action="store_true", help="print JSON (NDJSON for lists), for scripts and tools")
    g.add_argument(
        "--outbox", metavar="PATH", help="outbox file (env BUSD_OUTBOX; default $XDG_STATE_HOME/busd/outbox.db)"
    )
    g.add_argument("--no-outbox", action="store_true", help="fail with exit 3 instead of queueing when the bus is down")
    g.add_argument(
        "--retry-for", metavar="S", type=float, default=5.0, help="keep trying to reach the bus this long (default 5)"
    )
    return p


def add_parsers(sub: Any) -> None:
    """Add the client commands to ``busd``'s sub-parsers."""
    common = [_common()]

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, description: str) -> Any:
        p = sub.add_parser(name, parents=common, help=help, description=description)
        p.set_defaults(func=_guarded(func))
        return p

    p = add(
        "send",
        cmd_send,
        "send a message",
        "Send a message to an agent (or ALL). The body is --body, else stdin. If the bus cannot be reached, "
        "the message waits in the outbox and is delivered, once, by the next busd command that reaches it.",
    )
    p.add_argument("to", metavar="TO", help="recipient agent, or ALL for every known agent")
    p.add_argument("subject", metavar="SUBJECT", nargs="?", default="", help="subject line (default empty)")
    p.add_argument("--body", metavar="TEXT", help="message body (default: read stdin)")
    p.add_argument("--from", dest="sender", metavar="NAME", help="sender (default $BUSD_AGENT)")
    p.add_argument("--reply-to", metavar="ID", type=int, help="id of the message this answers")
    p.add_argument("--key", metavar="K", help="idempotency key: a second send with it stores nothing new")

    p = add(
        "inbox",
        cmd_inbox,
        "show unread messages",
        "Show the unread messages of an inbox, oldest first. They stay unread until acked (--ack, or busd ack).",
    )
    p.add_argument("agent", metavar="AGENT", nargs="?", help="whose inbox (default $BUSD_AGENT)")
    p.add_argument("--wait", metavar="S", type=float, default=0.0, help="wait up to S seconds (max 60) for a message")
    p.add_argument("--ack", action="store_true", help="mark the messages shown as read")
    p.add_argument("--limit", metavar="N", type=int, default=100, help="show at most N (1 to 1000, default 100)")

    p = add(
        "tail",
        cmd_tail,
        "follow an inbox",
        "Print messages as they arrive, until interrupted. Without --ack they stay unread (and are shown once).",
    )
    p.add_argument("agent", metavar="AGENT", nargs="?", help="whose inbox (default $BUSD_AGENT)")
    p.add_argument("--ack", action="store_true", help="mark each message read once printed")

    p = add("ack", cmd_ack, "mark messages read", "Mark every message of the inbox with id <= ID as read.")
    p.add_argument("agent", metavar="AGENT", nargs="?", help="whose inbox (default $BUSD_AGENT)")
    p.add_argument("id", metavar="ID", type=int, help="the highest id to mark read")

    add("agents", cmd_agents, "list agents", "List known agents with their unread counts and when they were last seen.")
    add("stats", cmd_stats, "show bus statistics", "Show the daemon's counters.")
    add("ping", cmd_ping, "check the bus answers", "Check that the bus answers (and the token works).")

    p = add(
        "outbox",
        cmd_outbox,
        "list or deliver queued sends",
        "List the messages waiting in the local outbox (sends made while the bus was unreachable); "
        "--flush delivers this bus's, in order.",
    )
    p.add_argument("--flush", action="store_true", help="deliver them now")


# ---- plumbing ---------------------------------------------------------------


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors to exit codes, said on stderr (and as JSON with --json)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except UsageError as e:
            print(f"busd {args.command}: {e}", file=sys.stderr)
            return USAGE
        except BusUnreachable as e:
            _fail(args, e, "bus unreachable")
            return UNREACHABLE
        except BusClientError as e:
            _fail(args, e, "refused")
            return REFUSED
        except KeyboardInterrupt:
            return 130

    return run


def _fail(args: argparse.Namespace, e: BusClientError, what: str) -> None:
    if isinstance(e, BusUnreachable):
        print(f"busd {args.command}: {e.message}", file=sys.stderr)
    else:
        print(f"busd {args.command}: {what} ({e.reason}): {e.message}", file=sys.stderr)
        if e.retry_after is not None:
            print(f"busd {args.command}: retry after {e.retry_after:g} s", file=sys.stderr)
    if args.json:
        error: dict[str, Any] = {"reason": str(e.reason), "message": e.message}
        if e.retry_after is not None:
            error["retry_after"] = e.retry_after
        if e.key is not None:
            error["key"] = e.key
        _json({"error": error})


def _client(args: argparse.Namespace) -> Client:
    outbox: str | bool = False if args.no_outbox else (args.outbox or True)
    try:
        return Client(args.url, token=args.token, outbox=outbox, retry=Backoff(total=max(0.0, args.retry_for)))
    except ValueError as e:  # a bad URL
        raise UsageError(str(e)) from None


def _agent(client: Client, given: str | None) -> str:
    agent = given or client.agent
    if not agent:
        raise UsageError("name the agent (AGENT or --from), or set BUSD_AGENT")
    return agent


def _json(obj: Any) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")


def _ndjson(items: Iterable[Any]) -> None:
    for item in items:
        _json(item)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(f"busd: {text}", file=sys.stderr)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _width() -> int:
    return max(40, min(100, shutil.get_terminal_size((80, 24)).columns))


def wrap_body(body: str, width: int) -> str:
    """Long lines wrapped at ``width``; line breaks, blank lines and indented
    lines (code, lists) kept as they are."""
    out: list[str] = []
    for line in body.splitlines() or [""]:
        if len(line) <= width or line[:1].isspace():
            out.append(line)
        else:
            out.extend(textwrap.wrap(line, width, break_on_hyphens=False) or [""])
    return "\n".join(out)


def format_message(m: Message, width: int) -> str:
    head = f"--- #{m.id} "
    lines = [
        head + "-" * max(3, width - len(head)),
        f"From:     {m.from_}",
        f"To:       {m.to}",
        f"Date:     {m.timestamp}",
        f"Subject:  {m.subject}",
    ]
    if isinstance(m.reply_to, int):
        lines.append(f"Reply-To: #{m.reply_to}")
    lines.append("")
    lines.append(wrap_body(m.body, width))
    return "\n".join(lines) + "\n"


def _print_messages(messages: list[Message], as_json: bool) -> None:
    if as_json:
        _ndjson(messages)
        return
    width = _width()
    for m in messages:
        sys.stdout.write(format_message(m, width) + "\n")
    sys.stdout.flush()


# ---- commands ---------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    with _client(args) as c:
        sender = _agent(c, args.sender)
        if args.body is not None:
            body = args.body
        else:
            if sys.stdin.isatty():
                _note("reading the body from stdin; end it with Ctrl-D")
            body = sys.stdin.read()
        r = c.send(args.to, body, subject=args.subject, from_=sender, reply_to=args.reply_to, key=args.key)
        if r.queued:
            assert c.outbox is not None
            _note(f"bus unreachable at {c.bus}: queued in the outbox {c.outbox.path} (key {r.key})")
    if args.json:
        _json(r)
    elif not r.queued:
        dup = " (already sent: duplicate key)" if r.duplicate else ""
        print(f"sent #{r.id} to {args.to}, {_plural(r.recipients or 0, 'recipient')}{dup}")
    return OK


def cmd_inbox(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit must be 1 to 1000")
    if not 0 <= args.wait <= 60:
        raise UsageError("--wait must be 0 to 60 seconds")
    with _client(args) as c:
        agent = _agent(c, args.agent)
        messages = c.inbox(agent, wait=args.wait, limit=args.limit)
        acked = 0
        if args.ack and messages:
            acked = c.ack(messages[-1].id, agent=agent)
    _print_messages(messages, args.json)
    if not args.json:
        if not messages:
            _note(f"no unread messages for {agent}")
        elif args.ack:
            _note(f"{_plural(len(messages), 'message')} for {agent}; acked through #{messages[-1].id} ({acked} newly)")
        else:
            last = messages[-1].id
            _note(f"{_plural(len(messages), 'unread message')} for {agent}; mark read: busd ack {agent} {last}")
    return OK


def cmd_tail(args: argparse.Namespace) -> int:
    with _client(args) as c:
        agent = _agent(c, args.agent)
        shown = 0  # the highest id printed (without --ack, messages stay unread)
        down = False
        try:
            while True:
                try:
                    # without --ack, shown messages stay unread: ask only for newer ones
                    messages = c.inbox(agent, wait=TAIL_WAIT, limit=TAIL_LIMIT, after=0 if args.ack else shown)
                except BusUnreachable as e:
                    if not down:
                        _note(f"{e}; still trying")
                        down = True
                    time.sleep(1.0)
                    continue
                if down:
                    _note(f"reconnected to {c.bus}")
                    down = False
                _print_messages(messages, args.json)
                if messages:
                    shown = messages[-1].id
                    if args.ack:
                        c.ack(shown, agent=agent)
        except KeyboardInterrupt:
            return OK


def cmd_ack(args: argparse.Namespace) -> int:
    if args.id < 0:
        raise UsageError("ID must be 0 or more")
    with _client(args) as c:
        agent = _agent(c, args.agent)
        acked = c.ack(args.id, agent=agent)
    if args.json:
        _json({"agent": agent, "up_to": args.id, "acked": acked})
    else:
        print(f"acked {_plural(acked, 'message')} of {agent} (through #{args.id})")
    return OK


def cmd_agents(args: argparse.Namespace) -> int:
    with _client(args) as c:
        agents = c.agents()
    if args.json:
        _ndjson(agents)
    else:
        print(format_agents(agents), end="")
    return OK


def format_agents(agents: list[AgentInfo]) -> str:
    rows = [("NAME", "UNREAD", "LAST SEEN")] + [(a.name, str(a.unread), a.last_seen or "never") for a in agents]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "".join(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]}\n" for r in rows)


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        stats = c.stats()
        bus = c.bus
    if args.json:
        _json(stats)
    else:
        print(format_stats(stats, bus), end="")
    return OK


def format_stats(s: StatsResult, bus: str) -> str:
    w = s.writer
    rows = [
        ("bus", bus),
        ("version", s.version),
        ("uptime", f"{s.uptime_s:.0f} s"),
        ("database", s.db),
        ("connections", f"{s.connections_open} open, {s.connections_total} since start"),
        ("requests", str(s.requests)),
        ("agents", str(s.agents)),
        ("unread", str(s.unread)),
        ("last id", str(s.last_id)),
        ("waiters", str(s.waiters)),
        (
            "writer",
            f"{w.batches} commits of {w.ops} writes (mean batch {w.mean_batch:.1f}, max {w.max_batch}); "
            f"commit {w.commit_ms_mean:.1f} ms mean, {w.commit_ms_last:.1f} ms last; {w.queued} queued",
        ),
    ]
    return "".join(f"{k:<12} {v}\n" for k, v in rows)


def cmd_ping(args: argparse.Namespace) -> int:
    with _client(args) as c:
        start = time.monotonic()
        pong = c.ping()
        rtt = (time.monotonic() - start) * 1000
        bus = c.bus
    if args.json:
        _json({"pong": pong.pong, "time": pong.time, "bus": bus, "rtt_ms": round(rtt, 3)})
    else:
        print(f"pong from {bus} in {rtt:.1f} ms (bus time {pong.time})")
    return OK


def cmd_outbox(args: argparse.Namespace) -> int:
    if args.no_outbox:
        raise UsageError("--no-outbox: there is no outbox to show")
    with _client(args) as c:
        assert c.outbox is not None
        if not args.flush:
            entries = c.outbox.entries()
            if args.json:
                _ndjson(entries)
            elif entries:
                print(format_outbox(entries), end="")
            else:
                _note(f"the outbox {c.outbox.path} is empty")
            return OK
        report = c.flush()
        path = c.outbox.path
        bus = c.bus
    if args.json:
        _json(report)
    else:
        print(
            f"delivered {len(report.delivered)}, refused for good {len(report.failed)}, "
            f"still queued {report.remaining} (outbox {path})"
        )
        for e in report.failed:
            _note(f"#{e.seq} {e.from_} -> {e.to} refused: {e.error}")
    if not report.reached:
        _note(f"bus unreachable at {bus}; {_plural(report.remaining, 'message')} still queued")
        return UNREACHABLE
    return OK


def format_outbox(entries: list[Entry]) -> str:
    width = _width()
    out = []
    for e in entries:
        status = f"FAILED {e.error}" if e.error else "queued"
        subject = f" {e.subject!r}" if e.subject else ""
        line = f"{e.seq:>4}  {e.queued_at}  {e.bus}  {e.from_} -> {e.to}{subject}  [{status}]  key {e.key}"
        out.append(line)
        preview = " ".join(e.body.split())
        if preview:
            out.append("      " + textwrap.shorten(preview, max(20, width - 6), placeholder=" ..."))
    return "\n".join(out) + "\n"


__all__ = ["add_parsers", "format_message", "wrap_body"]
