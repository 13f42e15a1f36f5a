"""The crash-loop checker: replays a run's history against the contract.

    python -m tests.faults.checker DIR      (from the repository root)

DIR holds everything a run leaves behind, so a failure can be checked again
(and the checker itself debugged) long after the daemon is gone:

  hist-w<N>.jsonl   every request and reply of client process N, in order
  hist-final.jsonl  the harness's own reads of every inbox after the last crash
  events.jsonl      the harness: daemon up, kill -9, power cut, restart (+ stats)
  final.db          the database after the last, clean, shutdown

History records (one JSON object a line; ``t`` is CLOCK_MONOTONIC, shared by
every process on the machine, so records of different processes compare):

  {"ev": "req", "t", "w", "c", "gen", "via", "rid", "m": method, "p": params}
  {"ev": "rep", "t", "w", "c", "gen", "rid", "r": result}   or  "e": {"reason", ...}
  {"ev": "lost", "t", "w", "c", "rids": [...], "why"}        no reply came for those
  {"ev": "connect" | "start" | "done", ...}

What must hold (the contract's durability, order and ack rules under crashes):

  - every acknowledged send is in the final database exactly once, with the
    id it was acknowledged with (else it counts as *lost*); nothing is there
    that nobody sent; a resend of a key answers the original id;
  - per sender, ids follow the order of sending; sends pipelined on one
    connection commit in the order written;
  - ids never go backwards: a send written after another send's reply has a
    larger id, and a restarted daemon's last id is at least every id it had
    acknowledged before the crash;
  - a message never comes back unread after its ack was answered, neither in
    a later read nor in the final database;
  - every read shows each message with the id, sender, recipient and body it
    was sent with, in id order; the database's unread counters match its rows;
  - no request is refused and no live daemon leaves a request unanswered.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

MAX_LISTED = 25


@dataclass
class SendRec:
    sender: str
    key: str
    to: str
    subject: str
    body: str
    seq: int
    attempts: int = 0
    ids: set[int] = field(default_factory=set)  # from replies
    seen_ids: set[int] = field(default_factory=set)  # from reads
    recipients: int | None = None
    first_reply_t: float | None = None


@dataclass
class Reply:
    t_req: float
    t_rep: float
    id: int
    dup: bool
    conn: tuple[Any, int]
    rid: int
    send: SendRec


@dataclass
class Report:
    dir: str
    restarts: int = 0
    startup_kills: int = 0
    power_cuts: int = 0
    requests: int = 0
    sends: int = 0
    sends_acked: int = 0
    resends: int = 0
    duplicate_replies: int = 0
    broadcasts: int = 0
    reads: int = 0
    messages_read: int = 0
    acks: int = 0
    db_messages: int = 0
    db_inbox_rows: int = 0
    lost: list[str] = field(default_factory=list)
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def fail(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.examples) < MAX_LISTED:
            self.examples.append(f"{kind}: {detail}")

    @property
    def ok(self) -> bool:
        return not self.violations and not self.lost

    def figures(self) -> str:
        return (
            f"restarts={self.restarts} (power cuts {self.power_cuts}, kills during start-up {self.startup_kills}) "
            f"requests={self.requests} sends={self.sends} acked={self.sends_acked} resends={self.resends} "
            f"duplicate-replies={self.duplicate_replies} broadcasts={self.broadcasts} reads={self.reads} "
            f"messages-read={self.messages_read} acks={self.acks} db-messages={self.db_messages} "
            f"db-inbox-rows={self.db_inbox_rows} lost-acked={len(self.lost)}"
        )

    def summary(self) -> str:
        lines = [f"history: {self.dir}", self.figures()]
        if self.errors:
            lines.append(f"refusals: {dict(self.errors)}")
        if self.lost:
            lines.append(f"LOST {len(self.lost)} acknowledged sends, e.g.:")
            lines += ["  " + x for x in self.lost[:MAX_LISTED]]
        if self.violations:
            lines.append(f"VIOLATIONS {dict(self.violations)}:")
            lines += ["  " + x for x in self.examples]
        return "\n".join(lines)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    out.append({"ev": "garbled", "line": line[:200]})
    return out


def _parse_subject(subject: str) -> tuple[str, int] | None:
    sender, sep, n = subject.rpartition("#")
    if not sep or not n.isdigit():
        return None
    return sender, int(n)


class Checker:
    def __init__(self, dir: str) -> None:
        self.dir = dir
        self.report = Report(dir)
        self.sends: dict[tuple[str, str], SendRec] = {}
        self.replies: list[Reply] = []
        self.acked_floor: dict[str, int] = defaultdict(int)
        self.acked_ids: dict[str, set[int]] = defaultdict(set)
        self.events = _read_jsonl(os.path.join(dir, "events.jsonl")) if os.path.exists(
            os.path.join(dir, "events.jsonl")) else []
        self.workers = {
            os.path.basename(p)[5:-6]: _read_jsonl(p) for p in sorted(glob.glob(os.path.join(dir, "hist-w*.jsonl")))
        }
        final = os.path.join(dir, "hist-final.jsonl")
        self.final_reads = _read_jsonl(final) if os.path.exists(final) else []

    # -- pass 1: sends and their replies ------------------------------------------

    def collect_sends(self) -> None:
        r = self.report
        for name, records in self.workers.items():
            reqs: dict[int, dict[str, Any]] = {}
            for rec in records:
                ev = rec.get("ev")
                if ev == "garbled":
                    r.fail("garbled history", f"{name}: {rec['line']}")
                elif ev == "req":
                    r.requests += 1
                    reqs[rec["rid"]] = rec
                    if rec["m"] == "send":
                        self._send_request(name, rec)
                elif ev == "rep":
                    req = reqs.get(rec["rid"])
                    if req is None:
                        r.fail("reply to nothing", f"{name}: {rec}")
                        continue
                    if "e" in rec:
                        reason = rec["e"].get("reason")
                        r.errors[f"{req['m']}:{reason}"] += 1
                        r.fail("refused", f"{name} {req['m']} {req['p']} -> {rec['e']}")
                    elif req["m"] == "send":
                        self._send_reply(name, req, rec)
                elif ev == "lost":
                    if rec.get("why") == "timeout":
                        r.fail("no reply from a live daemon", f"{name} rids {rec['rids']}")
                elif ev == "done":
                    if rec.get("pending"):
                        r.fail("unanswered at the end", f"{name}: {rec['pending']} sends never answered")
                    if rec.get("error"):
                        r.fail("worker gave up", f"{name}: {rec['error']}")
            if not records or records[-1].get("ev") != "done":
                r.fail("worker did not finish", f"{name}: history ends without 'done'")

    def _send_request(self, name: str, rec: dict[str, Any]) -> None:
        p = rec["p"]
        k = (p["from"], p["key"])
        sr = self.sends.get(k)
        parsed = _parse_subject(p["subject"])
        if sr is None:
            seq = parsed[1] if parsed else 0
            sr = self.sends[k] = SendRec(p["from"], p["key"], p["to"], p["subject"], p["body"], seq)
            self.report.sends += 1
            if p["to"] == "ALL":
                self.report.broadcasts += 1
        elif (sr.to, sr.body) != (p["to"], p["body"]):
            self.report.fail("client bug", f"{name}: key {k} reused for a different message")
        else:
            self.report.resends += 1
        sr.attempts += 1

    def _send_reply(self, name: str, req: dict[str, Any], rec: dict[str, Any]) -> None:
        p, res = req["p"], rec["r"]
        sr = self.sends[(p["from"], p["key"])]
        mid, dup = res.get("id"), bool(res.get("duplicate"))
        if not isinstance(mid, int) or mid <= 0:
            self.report.fail("bad reply", f"{name}: {res}")
            return
        if sr.ids and mid not in sr.ids:
            self.report.fail(
                "one send, two ids", f"{sr.sender}/{sr.key} answered id {sorted(sr.ids)} and now {mid} (dup={dup})"
            )
        if not sr.ids:
            self.report.sends_acked += 1
            sr.first_reply_t = rec["t"]
        elif not dup:
            self.report.fail("stored twice", f"{sr.sender}/{sr.key}: a second non-duplicate reply, id {mid}")
        if dup:
            self.report.duplicate_replies += 1
        sr.ids.add(mid)
        if sr.recipients is None:
            sr.recipients = res.get("recipients")
        self.replies.append(Reply(req["t"], rec["t"], mid, dup, (name, req["c"]), req["rid"], sr))

    # -- order and monotonic ids --------------------------------------------------

    def check_order(self) -> None:
        r = self.report
        # pipelined on one connection: commit order = write order
        by_conn: dict[tuple[Any, int], list[Reply]] = defaultdict(list)
        for rep in self.replies:
            if not rep.dup:
                by_conn[rep.conn].append(rep)
        for conn, reps in by_conn.items():
            reps.sort(key=lambda x: x.rid)
            for a, b in zip(reps, reps[1:]):
                if not a.id < b.id:
                    r.fail("pipelined order", f"conn {conn}: {a.send.key} got {a.id}, then {b.send.key} got {b.id}")
        # per sender: ids in the order of sending
        per_sender: dict[str, list[SendRec]] = defaultdict(list)
        for sr in self.sends.values():
            if sr.ids:
                per_sender[sr.sender].append(sr)
        for sender, srs in per_sender.items():
            srs.sort(key=lambda s: s.seq)
            for a, b in zip(srs, srs[1:]):
                if not min(a.ids) < min(b.ids):
                    r.fail("sender order", f"{sender}: #{a.seq} has id {min(a.ids)}, #{b.seq} has id {min(b.ids)}")
        # causality: a send written after any reply was received has a larger id
        done = sorted(self.replies, key=lambda x: x.t_rep)
        times = [x.t_rep for x in done]
        prefix_max: list[int] = []
        best = 0
        for x in done:
            best = max(best, x.id)
            prefix_max.append(best)
        for b in self.replies:
            if b.dup:
                continue
            i = bisect.bisect_left(times, b.t_req)
            if i and prefix_max[i - 1] >= b.id:
                r.fail(
                    "id went backwards",
                    f"{b.send.sender}/{b.send.key} got id {b.id}, but id {prefix_max[i - 1]} had already been acknowledged",
                )
        # a restarted daemon knows every id acknowledged before the crash
        kill_t: dict[int, float] = {}
        for ev in self.events:
            if ev.get("ev") == "kill":
                kill_t[ev["gen"]] = ev["t"]
                r.restarts += 1
                r.power_cuts += ev.get("how") == "powercut"
            elif ev.get("ev") == "stopped" and ev.get("code") != 0:
                r.fail("unclean shutdown", f"busd exited {ev.get('code')} on SIGTERM")
            elif ev.get("ev") == "startup-kill":
                r.startup_kills += 1
            elif ev.get("ev") == "restarted" and ev["gen"] - 1 in kill_t:
                i = bisect.bisect_left(times, kill_t[ev["gen"] - 1])
                if i and ev["last_id"] < prefix_max[i - 1]:
                    r.fail(
                        "id went backwards",
                        f"after restart {ev['gen']} last_id={ev['last_id']}, but id {prefix_max[i - 1]} was acknowledged before the crash",
                    )

    # -- pass 2: acks and reads -----------------------------------------------------

    def check_reads(self) -> None:
        for name, records in self.workers.items():
            self._replay_reads(name, records)
        self._replay_reads("final", self.final_reads)

    def _replay_reads(self, name: str, records: list[dict[str, Any]]) -> None:
        reqs: dict[int, tuple[dict[str, Any], int, frozenset[int]]] = {}
        for rec in records:
            ev = rec.get("ev")
            if ev == "req" and rec["m"] in ("inbox", "ack"):
                agent = rec["p"]["agent"]
                reqs[rec["rid"]] = (rec, self.acked_floor[agent], frozenset(self.acked_ids[agent]))
            elif ev == "rep" and rec["rid"] in reqs and "r" in rec:
                req, floor, ids = reqs.pop(rec["rid"])
                p = req["p"]
                agent = p["agent"]
                if req["m"] == "ack":
                    self.report.acks += 1
                    self._acked(agent, p.get("up_to"), p.get("ids"))
                    continue
                if p.get("ack"):
                    self.report.acks += 1
                    self._acked(agent, p["ack"], None)
                    floor = max(floor, p["ack"])
                self._check_read(name, agent, rec["r"].get("messages", []), floor, ids, p.get("limit", 100))

    def _acked(self, agent: str, up_to: int | None, ids: list[int] | None) -> None:
        if up_to:
            self.acked_floor[agent] = max(self.acked_floor[agent], up_to)
        if ids:
            self.acked_ids[agent].update(ids)

    def _check_read(
        self, name: str, agent: str, messages: list[dict[str, Any]], floor: int, acked: frozenset[int], limit: int
    ) -> None:
        r = self.report
        r.reads += 1
        r.messages_read += len(messages)
        if len(messages) > limit:
            r.fail("read over limit", f"{name} {agent}: {len(messages)} > {limit}")
        last = 0
        for m in messages:
            mid = m.get("id")
            if not isinstance(mid, int) or mid <= last:
                r.fail("read order", f"{name} {agent}: id {mid} after {last}")
            last = mid if isinstance(mid, int) else last
            if mid <= floor or mid in acked:
                r.fail("acked message came back", f"{name} {agent}: id {mid} (acked up to {floor})")
            if m.get("to") not in (agent, "ALL"):
                r.fail("wrong inbox", f"{name} {agent}: got {m}")
            parsed = _parse_subject(m.get("subject", ""))
            sr = self.sends.get((parsed[0], f"k{parsed[1]}")) if parsed else None
            if sr is None:
                r.fail("phantom message", f"{name} {agent}: {m}")
                continue
            if (m.get("from"), m.get("to"), m.get("body")) != (sr.sender, sr.to, sr.body):
                r.fail("message altered", f"{name} {agent}: id {mid} is not what {sr.sender} sent as {sr.key}")
            if sr.to != "ALL" and sr.to != agent:
                r.fail("wrong inbox", f"{name} {agent}: {sr.sender}/{sr.key} was for {sr.to}")
            sr.seen_ids.add(mid)
            if sr.ids and mid not in sr.ids:
                r.fail("read id differs from acked id", f"{sr.sender}/{sr.key}: acked {sorted(sr.ids)}, read {mid}")
            if len(sr.seen_ids) > 1:
                r.fail("delivered twice", f"{sr.sender}/{sr.key} read as ids {sorted(sr.seen_ids)}")
            if not (isinstance(m.get("timestamp"), str) and m["timestamp"].endswith("Z")):
                r.fail("bad timestamp", f"{m}")
        # per sender inside one read: the order of sending
        by_sender: dict[str, list[int]] = defaultdict(list)
        for m in messages:
            parsed = _parse_subject(m.get("subject", ""))
            if parsed:
                by_sender[parsed[0]].append(parsed[1])
        for sender, seqs in by_sender.items():
            if seqs != sorted(seqs):
                r.fail("sender order in a read", f"{name} {agent}: from {sender} seqs {seqs}")

    # -- the final database -------------------------------------------------------------

    def check_db(self) -> None:
        r = self.report
        path = os.path.join(self.dir, "final.db")
        if not os.path.exists(path):
            r.fail("no final database", path)
            return
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            integrity = conn.execute("PRAGMA integrity_check").fetchall()
            if integrity != [("ok",)]:
                r.fail("database corrupt", str(integrity[:5]))
            rows = conn.execute(
                "SELECT id, sender, recipient, subject, body, key, recipients FROM messages ORDER BY id"
            ).fetchall()
            inbox = conn.execute("SELECT message_id, agent, read_at FROM inbox").fetchall()
            agents = conn.execute("SELECT name, unread FROM agents").fetchall()
            seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        finally:
            conn.close()
        r.db_messages, r.db_inbox_rows = len(rows), len(inbox)
        by_id = {row[0]: row for row in rows}
        bodies = Counter((row[1], row[4]) for row in rows)
        for (sender, body), n in bodies.items():
            if n > 1:
                r.fail("stored twice", f"{sender}: {n} rows with body {body[:40]!r}")
        for row in rows:
            mid, sender, to, subject, body, key, _ = row
            sr = self.sends.get((sender, key or ""))
            if sr is None:
                r.fail("phantom row", f"id {mid} {sender}->{to} key {key}")
            elif (to, subject, body) != (sr.to, sr.subject, sr.body):
                r.fail("row altered", f"id {mid} is not what {sender} sent as {key}")
        rows_of: dict[int, list[tuple[str, Any]]] = defaultdict(list)
        for mid, agent, read_at in inbox:
            rows_of[mid].append((agent, read_at))
            if mid not in by_id:
                r.fail("inbox row without message", f"id {mid} for {agent}")
        max_acked = 0
        for sr in self.sends.values():
            if not sr.ids:
                continue
            mid = min(sr.ids)
            max_acked = max(max_acked, mid)
            row = by_id.get(mid)
            if row is None or (row[1], row[5], row[4]) != (sr.sender, sr.key, sr.body):
                found = f"id {mid} now holds {row[1]}/{row[5]}" if row else f"id {mid} is gone"
                r.lost.append(f"{sr.sender}/{sr.key} -> {sr.to} acked as id {mid}; {found}")
                continue
            owners = [a for a, _ in rows_of[mid]]
            if sr.to == "ALL":
                if sr.sender in owners or len(owners) != len(set(owners)) or len(owners) != row[6]:
                    r.fail("broadcast copies", f"id {mid}: recipients={row[6]}, inbox rows for {sorted(owners)}")
                if sr.recipients is not None and sr.recipients != len(owners):
                    r.fail("broadcast copies", f"id {mid}: reply said {sr.recipients} recipients, {len(owners)} rows")
            elif owners != [sr.to]:
                r.fail("delivery", f"id {mid} for {sr.to}: inbox rows for {owners}")
        if seq_row is None or seq_row[0] < max_acked:
            r.fail("id went backwards", f"sqlite_sequence {seq_row} < acknowledged id {max_acked}")
        unread_rows: dict[str, list[int]] = defaultdict(list)
        for mid, agent, read_at in inbox:
            if read_at is None:
                unread_rows[agent].append(mid)
                if mid <= self.acked_floor[agent] or mid in self.acked_ids[agent]:
                    r.fail("acked message came back", f"final db: {agent} id {mid} unread (acked up to {self.acked_floor[agent]})")
        for name, unread in agents:
            if unread != len(unread_rows.get(name, [])):
                r.fail("unread counter", f"{name}: agents.unread={unread}, {len(unread_rows.get(name, []))} unread rows")
        # the harness's reads after the last crash show exactly the database's unread rows
        for rec in self.final_reads:
            if rec.get("ev") == "rep" and "e" in rec:
                r.fail("refused", f"final read of {rec.get('agent')}: {rec['e']}")
            if rec.get("ev") == "rep" and "r" in rec:
                agent = rec.get("agent")
                want = sorted(unread_rows.get(agent, []))[: rec.get("limit", 1000)]
                got = [m["id"] for m in rec["r"]["messages"]]
                if got != want:
                    r.fail("final read differs from the database", f"{agent}: read {got[:10]}..., db {want[:10]}...")

    def run(self) -> Report:
        self.collect_sends()
        self.check_order()
        self.check_reads()
        self.check_db()
        return self.report


def check(dir: str) -> Report:
    return Checker(dir).run()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.faults.checker HISTORY_DIR", file=sys.stderr)
        return 2
    report = check(argv[1])
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
