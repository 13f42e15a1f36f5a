"""One client process of the crash loop: sustained mixed load on busd while
the daemon is killed and restarted under it.

    python tests/faults/loadworker.py --dir D --worker W --workers N [...]

Worker W owns agents ``w<W>a0 .. w<W>a<A-1>``: it sends as them (with
idempotency keys, in pipelined bursts, some broadcasts), reads their inboxes
and acks what it has read. Every request and every reply goes to
``D/hist-w<W>.jsonl`` (see checker.py for the record format); the worker
itself checks nothing, the checker replays that history afterwards.

Where the daemon is: ``D/port.json`` (``{"port", "gen"}``), rewritten by the
harness at every restart; read again at every reconnect.

A send whose reply never came (the connection died) is resent with the same
key, in order, until it is answered, so by the end every send is
acknowledged exactly once. The worker stops when ``D/stop`` appears (after
resending what is still unanswered), at ``--seconds``, or when its parent
goes away. Blocking sockets and the standard library (plus h11), so a
worker costs little CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from typing import Any
from urllib.parse import urlencode

import h11

REPLY_TIMEOUT = 30.0  # a live daemon that says nothing for this long is hung
CONNECT_RETRY = 0.03


class Lost(Exception):
    """The connection died (or timed out) before every reply came."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class History:
    def __init__(self, path: str, worker: int) -> None:
        self.f = open(path, "a", buffering=1 << 16)
        self.worker = worker
        self.conn = 0
        self.gen = -1
        self.via = "jsonl"

    def write(self, ev: str, **fields: Any) -> None:
        rec = {"t": round(time.monotonic(), 6), "ev": ev, "w": self.worker, "c": self.conn, "gen": self.gen}
        rec.update(fields)
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.f.close()


def where(dir: str) -> tuple[int, int]:
    with open(os.path.join(dir, "port.json")) as f:
        info = json.load(f)
    return int(info["port"]), int(info["gen"])


def connect(dir: str, stop_at: float) -> tuple[socket.socket, int]:
    """A TCP connection to the current daemon; retries while it is down."""
    while True:
        if time.monotonic() > stop_at:
            raise TimeoutError("daemon unreachable until the deadline")
        try:
            port, gen = where(dir)
            s = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s, gen
        except (OSError, ValueError, KeyError):
            time.sleep(CONNECT_RETRY)


class JsonLines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def write(self, reqs: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in reqs)
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Lost(f"write: {e}") from None

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Lost("timeout") from None
            except OSError as e:
                raise Lost(f"read: {e}") from None
            if not chunk:
                raise Lost("eof")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


class Http:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        headers = [("host", "127.0.0.1")]
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if data:
            out += self.conn.send(h11.Data(data=data))
        out += self.conn.send(h11.EndOfMessage())
        try:
            self.sock.sendall(out)
        except OSError as e:
            raise Lost(f"write: {e}") from None
        status, payload = 0, b""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                raise Lost(f"http: {e}") from None
            if event is h11.NEED_DATA:
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    raise Lost("timeout") from None
                except OSError as e:
                    raise Lost(f"read: {e}") from None
                self.conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                payload += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise Lost("eof")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        else:
            self.sock.close()
            self.conn = None  # type: ignore[assignment]
        return status, json.loads(payload)

    def close(self) -> None:
        self.sock.close()


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.dir = args.dir
        self.w = args.worker
        self.rng = random.Random(f"{args.seed}/{args.worker}")
        self.own = [f"w{self.w}a{i}" for i in range(args.agents)]
        self.everyone = [f"w{w}a{i}" for w in range(args.workers) for i in range(args.agents)]
        self.http_share = args.http_share
        self.broadcast_share = args.broadcast_share
        self.stop_at = time.monotonic() + args.seconds
        self.parent = os.getppid()
        self.hist = History(os.path.join(self.dir, f"hist-w{self.w}.jsonl"), self.w)
        self.rid = 0
        self.seq = {a: 0 for a in self.own}
        self.pending: list[dict[str, Any]] = []  # sends not yet answered, in the order written
        self.seen = {a: 0 for a in self.own}  # highest id read, per own agent
        self.jl: JsonLines | None = None
        self.http: Http | None = None

    # -- connections -----------------------------------------------------------

    def _connect(self) -> tuple[socket.socket, int]:
        sock, gen = connect(self.dir, self.stop_at)
        self.hist.conn += 1
        self.hist.gen = gen
        return sock, gen

    def jsonl(self) -> JsonLines:
        if self.jl is None:
            sock, _ = self._connect()
            self.jl = JsonLines(sock)
            self.hist.write("connect", via="jsonl")
        return self.jl

    def httpc(self) -> Http:
        if self.http is None or self.http.conn is None:
            sock, _ = self._connect()
            self.http = Http(sock)
            self.hist.write("connect", via="http")
        return self.http

    def drop(self, rids: list[int], why: str, via: str) -> None:
        self.hist.write("lost", rids=rids, why=why, via=via)
        if via == "jsonl" and self.jl is not None:
            self.jl.close()
            self.jl = None
        if via == "http" and self.http is not None:
            self.http.close()
            self.http = None
        if why == "timeout":
            print(f"worker {self.w}: no reply in {REPLY_TIMEOUT}s", file=sys.stderr)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    # -- calls -------------------------------------------------------------------

    def call_jsonl(self, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any] | None]:
        """Pipeline ``calls`` on the JSON-lines connection; their replies in
        the same order (None: lost with the connection)."""
        conn = self.jsonl()
        reqs = []
        for method, params in calls:
            rid = self.next_rid()
            reqs.append({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            self.hist.write("req", via="jsonl", rid=rid, m=method, p=params)
        replies: dict[int, dict[str, Any]] = {}
        try:
            conn.write(reqs)
            while len(replies) < len(reqs):
                reply = conn.read()
                rid = reply.get("id")
                if "error" in reply:
                    err = reply["error"]
                    rec = {"reason": (err.get("data") or {}).get("reason"), "code": err.get("code"),
                           "message": err.get("message")}
                    self.hist.write("rep", rid=rid, e=rec)
                else:
                    self.hist.write("rep", rid=rid, r=reply["result"])
                replies[rid] = reply
        except Lost as e:
            self.drop([r["id"] for r in reqs if r["id"] not in replies], e.why, "jsonl")
        return [replies.get(r["id"]) for r in reqs]

    def call_http(self, method: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """One call through the HTTP shim, normalised like a JSON-lines reply."""
        conn = self.httpc()
        rid = self.next_rid()
        self.hist.write("req", via="http", rid=rid, m=method, p=params)
        try:
            if method == "send":
                status, body = conn.request("POST", "/api/send", params)
            else:
                query = {k: v for k, v in params.items() if k != "agent"}
                target = f"/api/inbox/{params['agent']}" + ("?" + urlencode(query) if query else "")
                status, body = conn.request("GET", target)
        except Lost as e:
            self.drop([rid], e.why, "http")
            return None
        if body.get("ok"):
            result = {k: v for k, v in body.items() if k not in ("ok", "agent")}
            self.hist.write("rep", rid=rid, r=result, status=status)
            return {"id": rid, "result": result}
        err = body.get("error", {})
        self.hist.write("rep", rid=rid, e={"reason": err.get("code"), "status": status, "message": err.get("message")})
        return {"id": rid, "error": err}

    # -- operations ----------------------------------------------------------------

    def new_send(self, sender: str, to: str) -> dict[str, Any]:
        self.seq[sender] += 1
        n = self.seq[sender]
        pad = "".join(self.rng.choices("abcdefghij", k=self.rng.choice([0, 10, 100, 600])))
        return {"from": sender, "to": to, "subject": f"{sender}#{n}", "body": f"{sender}#{n}#{pad}", "key": f"k{n}"}

    def flush_pending(self, via: str) -> None:
        """Send (or resend) every unanswered send, in order."""
        if not self.pending:
            return
        if via == "http":
            while self.pending:
                reply = self.call_http("send", self.pending[0])
                if reply is None or "error" in reply:
                    if reply is not None:
                        time.sleep(0.05)
                    return
                self.pending.pop(0)
            return
        replies = self.call_jsonl([("send", p) for p in self.pending])
        answered = 0
        for reply in replies:
            if reply is None or "error" in reply:
                break
            answered += 1
        if answered < len(replies) and replies[answered] is not None:
            time.sleep(0.05)  # refused (it should not be): do not spin
        # only a prefix counts as done: a later one answered after an
        # unanswered one is still resent (the key makes that harmless), so
        # ``pending`` stays in the order written
        del self.pending[:answered]

    def burst(self) -> None:
        sender = self.rng.choice(self.own)
        for _ in range(self.rng.randint(1, 4)):
            to = "ALL" if self.rng.random() < self.broadcast_share else self.rng.choice(self.everyone)
            self.pending.append(self.new_send(sender, to))
        self.flush_pending("http" if self.rng.random() < self.http_share else "jsonl")

    def read(self) -> None:
        agent = self.rng.choice(self.own)
        params: dict[str, Any] = {"agent": agent, "limit": self.rng.choice([5, 50, 500])}
        if self.seen[agent] and self.rng.random() < 0.5:
            params["ack"] = self.seen[agent]
        if self.rng.random() < self.http_share:
            reply = self.call_http("inbox", params)
        else:
            reply = self.call_jsonl([("inbox", params)])[0]
        if reply and "result" in reply:
            for m in reply["result"]["messages"]:
                self.seen[agent] = max(self.seen[agent], m["id"])

    def ack(self) -> None:
        agent = self.rng.choice(self.own)
        if not self.seen[agent]:
            return
        if self.rng.random() < 0.3:
            top = self.seen[agent]
            params = {"agent": agent, "ids": sorted({self.rng.randint(max(1, top - 20), top) for _ in range(3)})}
        else:
            params = {"agent": agent, "up_to": self.seen[agent]}
        self.call_jsonl([("ack", params)])

    def stopping(self) -> bool:
        return (
            os.path.exists(os.path.join(self.dir, "stop"))
            or time.monotonic() > self.stop_at
            or os.getppid() != self.parent
        )

    def run(self) -> int:
        self.hist.write("start", agents=self.own, everyone=self.everyone)
        try:
            while not self.stopping():
                if self.pending:
                    self.flush_pending("jsonl")
                    continue
                r = self.rng.random()
                if r < 0.55:
                    self.burst()
                elif r < 0.8:
                    self.read()
                else:
                    self.ack()
            # the stop: answer for everything sent
            while self.pending and time.monotonic() < self.stop_at and os.getppid() == self.parent:
                self.flush_pending("jsonl")
            self.hist.write("done", pending=len(self.pending), seq=self.seq)
        except TimeoutError as e:
            self.hist.write("done", pending=len(self.pending), seq=self.seq, error=str(e))
        finally:
            self.hist.close()
        return 0 if not self.pending else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--seed", default="0")
    p.add_argument("--seconds", type=float, default=600.0, help="hard stop, whatever happens")
    p.add_argument("--http-share", type=float, default=0.15)
    p.add_argument("--broadcast-share", type=float, default=0.04)
    return Worker(p.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
