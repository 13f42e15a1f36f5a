"""busd.client against a real daemon on loopback: every method of both
clients, refusals as BusClientError, reconnects after a restart, the retry
budget, and an idempotent retry when the connection is cut between a send and
its reply. The blocking Client runs in a worker thread (trio.to_thread) while
the daemon runs in the test's trio loop."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
import trio

from busd.client import (
    AsyncClient,
    Backoff,
    BusClientError,
    BusUnreachable,
    Client,
    Sent,
    Session,
    parse_url,
)
from busd.errors import Reason
from busd.wire import NoParams, SendParams

from .clientkit import in_thread, refused_port, running_bus

__all__ = ["refused_port"]  # a fixture

FAST = Backoff(initial=0.02, maximum=0.1, total=0.3)


# ---- the sans-IO pieces -----------------------------------------------------


def test_parse_url() -> None:
    assert parse_url("localhost:7700") == ("localhost", 7700)
    assert parse_url("http://10.0.0.5:8000") == ("10.0.0.5", 8000)
    assert parse_url("http://bus.example/") == ("bus.example", 7700)
    assert parse_url("bus") == ("bus", 7700)
    assert parse_url("[::1]:7701") == ("::1", 7701)
    for bad in ("https://bus:1", "bus:notaport", "http://bus:1/api"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_session_frames_and_matches_replies() -> None:
    s = Session()
    rid, line = s.request("send", SendParams(from_="a", to="b", body="hi", key="k"))
    req = json.loads(line)
    assert line.endswith(b"\n") and req["method"] == "send" and req["id"] == rid
    assert req["params"]["from"] == "a" and req["params"]["key"] == "k"
    other = json.dumps({"jsonrpc": "2.0", "id": rid + 1, "result": {"pong": True, "time": "t"}}).encode() + b"\n"
    mine = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"id": 5, "timestamp": "t", "recipients": 1}}).encode()
    data = other + mine + b"\n"
    s.feed(data[:30])  # bytes arrive in any pieces
    assert s.take(rid) is None
    s.feed(data[30:])
    reply = s.take(rid)
    assert reply is not None
    assert Session.result("send", reply).id == 5
    assert Session.result("ping", s.take(rid + 1)).pong is True  # type: ignore[arg-type]

    rid2, _ = s.request("ping", NoParams())
    err = {"code": -32029, "message": "slow down", "data": {"reason": "rate_limited", "retry_after": 1.5}}
    s.feed(json.dumps({"jsonrpc": "2.0", "id": rid2, "error": err}).encode() + b"\n")
    with pytest.raises(BusClientError) as e:
        Session.result("ping", s.take(rid2))  # type: ignore[arg-type]
    assert e.value.reason == Reason.RATE_LIMITED == "rate_limited"
    assert e.value.retry_after == 1.5 and e.value.code == -32029

    with pytest.raises(BusClientError) as e:
        s.request("send", SendParams(from_="a", to="b", body="x" * (1024 * 1024)))
    assert e.value.reason == "too_large"


def test_backoff_grows_caps_and_jitters() -> None:
    b = Backoff(initial=0.1, maximum=1.0, factor=2.0, total=10.0)
    rng = random.Random(7)
    delays = [b.delay(n, rng) for n in range(8)]
    for n, d in enumerate(delays):
        cap = min(1.0, 0.1 * 2**n)
        assert cap / 2 <= d <= cap
    assert len({round(d, 6) for d in delays[4:]}) > 1  # capped, yet not in lockstep


# ---- every method -----------------------------------------------------------


async def test_every_method_blocking(bus: Any) -> None:
    with trio.fail_after(15):
        with Client(f"127.0.0.1:{bus.port}", agent="manager", outbox=False) as c:
            assert (await in_thread(c.ping)).pong is True
            first = await in_thread(c.send, "coder", "build the login page", subject="Build login")
            assert isinstance(first, Sent) and not first.queued and first.id and first.recipients == 1
            assert len(first.key) >= 16 and first.timestamp and first.timestamp.endswith("Z")
            second = await in_thread(c.send, "coder", "and tests", reply_to=first.id, key="k-2")
            assert second.key == "k-2" and second.id is not None and second.id > first.id

            msgs = await in_thread(c.inbox, "coder")
            assert [(m.id, m.from_, m.subject, m.body) for m in msgs] == [
                (first.id, "manager", "Build login", "build the login page"),
                (second.id, "manager", "", "and tests"),
            ]
            assert msgs[1].reply_to == first.id
            assert await in_thread(c.inbox, "coder", limit=1) == msgs[:1]

            assert await in_thread(c.ack, first.id, agent="coder") == 1
            assert [m.id for m in await in_thread(c.inbox, "coder")] == [second.id]
            assert await in_thread(c.ack, ids=[second.id], agent="coder") == 1
            assert await in_thread(c.inbox, "coder") == []

            agents = {a.name: a for a in await in_thread(c.agents)}
            assert set(agents) == {"manager", "coder"} and agents["coder"].unread == 0
            stats = await in_thread(c.stats)
            assert stats.last_id == second.id and stats.unread == 0 and stats.writer.ops >= 2


async def test_every_method_async(bus: Any) -> None:
    with trio.fail_after(15):
        async with AsyncClient(f"127.0.0.1:{bus.port}", agent="manager", outbox=False) as c:
            assert (await c.ping()).pong is True
            sent = await c.send("coder", "hello", subject="hi")
            assert sent.id is not None and not sent.queued
            again = await c.send("coder", "hello", subject="hi", key=sent.key)
            assert (again.id, again.duplicate) == (sent.id, True)  # the key made it one message
            msgs = await c.inbox("coder")
            assert [m.body for m in msgs] == ["hello"]
            assert await c.ack(sent.id, agent="coder") == 1
            assert await c.inbox("coder") == []
            assert {a.name for a in await c.agents()} == {"manager", "coder"}
            assert (await c.stats()).last_id == sent.id
            broadcast = await c.send("ALL", "to everyone")
            assert broadcast.recipients == 1  # coder; never the sender


async def test_long_poll_does_not_hold_up_sends(bus: Any) -> None:
    """One client, two tasks: an inbox wait and a send on the same client."""
    with trio.fail_after(15):
        async with AsyncClient(f"127.0.0.1:{bus.port}", agent="coder", outbox=False) as c:
            got: list[Any] = []

            async def wait_for_mail() -> None:
                got.extend(await c.inbox(wait=20))

            async with trio.open_nursery() as n:
                n.start_soon(wait_for_mail)
                await trio.testing.wait_all_tasks_blocked(0.05)
                start = trio.current_time()
                await c.send("coder", "wake up", from_="manager")
            assert [m.body for m in got] == ["wake up"]
            assert trio.current_time() - start < 10  # answered by the send, not by the time-out


async def test_inbox_ack_parameter_acks_first(bus: Any) -> None:
    with trio.fail_after(10):
        async with AsyncClient(f"127.0.0.1:{bus.port}", agent="coder", outbox=False) as c:
            a = await c.send("coder", "one", from_="m")
            b = await c.send("coder", "two", from_="m")
            assert [m.id for m in await c.inbox(ack=a.id)] == [b.id]


# ---- refusals ---------------------------------------------------------------


async def test_refusals_raise_with_the_contract_reason(start_bus: Any, tmp_path: Any) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-a a\ntok-admin *\n")
    bus = await start_bus(tokens_file=str(tokens), max_body=100, direct_per_minute=2)
    url = f"127.0.0.1:{bus.port}"
    box = tmp_path / "outbox.db"
    with trio.fail_after(15):
        async with AsyncClient(url, token="tok-a", agent="a", outbox=box) as c:
            with pytest.raises(BusClientError) as e:
                await c.send("b", "x", from_="b")
            assert e.value.reason == "forbidden" and e.value.code == -32003 and e.value.key
            with pytest.raises(BusClientError) as e:
                await c.send("b", "x" * 101)
            assert e.value.reason == "too_large"
            with pytest.raises(BusClientError) as e:
                await c.send("no spaces", "x")
            assert e.value.reason == "bad_request"
            with pytest.raises(BusClientError) as e:
                await c.send("all", "x")
            assert e.value.reason == "bad_request"
            with pytest.raises(BusClientError) as e:
                await c.inbox("b")
            assert e.value.reason == "forbidden"
            assert await c.queued() == [] and not box.exists()  # final refusals are never queued

        async with AsyncClient(url, token="wrong", agent="a", outbox=False) as c:
            with pytest.raises(BusClientError) as e:
                await c.ping()
            assert e.value.reason == "unauthorized" and not isinstance(e.value, BusUnreachable)
        async with AsyncClient(url, agent="a", outbox=False) as c:  # no token at all
            with pytest.raises(BusClientError) as e:
                await c.ping()
            assert e.value.reason == "unauthorized"

        async with AsyncClient(url, token="tok-admin", agent="c", outbox=False) as c:
            await c.send("d", "1")
            await c.send("d", "2")
            with pytest.raises(BusClientError) as e:
                await c.send("d", "3")
            assert e.value.reason == "rate_limited" and e.value.retry_after is not None and e.value.retry_after > 0


async def test_blocking_client_with_token(start_bus: Any) -> None:
    bus = await start_bus(token="s3cret")
    with trio.fail_after(10):
        with Client(f"127.0.0.1:{bus.port}", token="s3cret", agent="a", outbox=False) as c:
            sent = await in_thread(c.send, "b", "hi")
            assert [m.id for m in await in_thread(c.inbox, "b")] == [sent.id]
        with Client(f"127.0.0.1:{bus.port}", token="nope", agent="a", outbox=False) as c:
            with pytest.raises(BusClientError) as e:
                await in_thread(c.ping)
            assert e.value.reason == "unauthorized"


async def test_http_url_speaks_json_lines_on_the_main_port(bus: Any) -> None:
    with trio.fail_after(10):
        async with AsyncClient(f"http://127.0.0.1:{bus.port}/", agent="a", outbox=False) as c:
            assert (await c.ping()).pong
        with Client(f"http://localhost:{bus.port}", agent="a", outbox=False) as sc:
            assert (await in_thread(sc.ping)).pong


def test_an_http_reply_is_a_clear_final_error() -> None:
    """Pointed at an HTTP-only port, the client says so instead of retrying."""
    s = Session()
    rid, _ = s.request("ping", NoParams())
    with pytest.raises(BusClientError) as e:
        s.feed(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    assert e.value.reason == "bad_request" and "HTTP-only" in e.value.message


# ---- unreachable, reconnect, retry budget -----------------------------------


async def test_unreachable_gives_up_within_the_budget(refused_port: int) -> None:
    budget = Backoff(initial=0.05, maximum=0.2, total=0.6)
    with trio.fail_after(10):
        with Client(f"127.0.0.1:{refused_port}", agent="a", outbox=False, retry=budget) as c:
            start = time.monotonic()
            with pytest.raises(BusUnreachable) as e:
                await in_thread(c.send, "b", "x")
            took = time.monotonic() - start
        assert e.value.reason == "unavailable" and e.value.key  # the key, to retry with
        assert 0.2 < took < 3.0
        async with AsyncClient(f"127.0.0.1:{refused_port}", agent="a", outbox=False, retry=Backoff(total=0)) as ac:
            with pytest.raises(BusUnreachable):
                await ac.ping()


async def test_reconnect_after_the_daemon_restarts(db_path: str) -> None:
    with trio.fail_after(30):
        async with running_bus(db_path) as first:
            port = first.port
            url = f"127.0.0.1:{port}"
            sync = Client(url, agent="a", outbox=False, retry=Backoff(initial=0.05, maximum=0.3, total=10))
            aclient = AsyncClient(url, agent="a", outbox=False, retry=Backoff(initial=0.05, maximum=0.3, total=10))
            one = await in_thread(sync.send, "b", "one")
            two = await aclient.send("b", "two")
        # both clients now hold a connection the dead daemon dropped
        async with running_bus(db_path, port=port):
            three = await in_thread(sync.send, "b", "three")
            four = await aclient.send("b", "four")
            assert [m.id for m in await aclient.inbox("b")] == [one.id, two.id, three.id, four.id]

        # calls made while the bus is down succeed once it is back (within the budget)
        results: list[Any] = []

        async def call_while_down() -> None:
            results.append(await in_thread(sync.inbox, "b"))
            results.append(await aclient.ping())

        async with trio.open_nursery() as n:
            n.start_soon(call_while_down)
            await trio.sleep(0.3)
            async with running_bus(db_path, port=port):
                with trio.fail_after(15):
                    while len(results) < 2:
                        await trio.sleep(0.02)
        assert [m.body for m in results[0]] == ["one", "two", "three", "four"]
        sync.close()
        await aclient.aclose()


# ---- a connection cut between a send and its reply --------------------------


class CuttingProxy:
    """A loopback proxy in front of the daemon. The first connection that
    carries a send is cut after the send reached the bus and the bus
    answered, before the answer reaches the client; the rest pass through."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.dropped: list[dict[str, Any]] = []
        self.connections = 0

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream) as upstream:
            if not self.dropped:
                line = await _read_line(client)
                assert b'"send"' in line
                await upstream.send_all(line)
                self.dropped.append(json.loads(await _read_line(upstream)))
                return  # both closed: the client never sees the reply
            async with trio.open_nursery() as n:
                n.start_soon(_pump, client, upstream, n.cancel_scope)
                n.start_soon(_pump, upstream, client, n.cancel_scope)


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        assert chunk, "closed early"
        data += chunk
    return data


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_retry_after_a_cut_connection_stores_the_message_once(bus: Any, nursery: Any, kind: str) -> None:
    proxy = CuttingProxy(bus.port)
    port = await nursery.start(proxy.serve)
    url = f"127.0.0.1:{port}"
    with trio.fail_after(15):
        if kind == "blocking":
            with Client(url, agent="a", outbox=False, retry=FAST) as c:
                sent = await in_thread(c.send, "b", "exactly once")
        else:
            async with AsyncClient(url, agent="a", outbox=False, retry=FAST) as ac:
                sent = await ac.send("b", "exactly once")
        assert len(proxy.dropped) == 1 and proxy.connections == 2
        first = proxy.dropped[0]["result"]  # the reply the client never saw
        assert (sent.id, sent.duplicate) == (first["id"], True)
        async with AsyncClient(f"127.0.0.1:{bus.port}", outbox=False) as direct:
            msgs = await direct.inbox("b")
        assert [(m.id, m.body) for m in msgs] == [(first["id"], "exactly once")]
