"""Abuse: a busd child process under connection floods, thousands of idle
connections, HTTP slowloris, random binary and a line without end, a client
that pipelines and never reads, and a broadcast storm. During each, a probe
client (tests/faults/_abuse_support.Probe) measures its round trips — they
must stay well under a second — and the daemon's resident memory is read from
/proc before and after: its growth must stay bounded. Figures are printed
(``pytest -s`` shows them).

The daemon's timeouts are module constants (minutes); where an attack needs
one to fire, the child gets a shorter value before it starts (timing only:
sockets and SQLite stay real). One in-process test shortens them with
monkeypatch instead.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
import trio

from busd import http as busd_http
from busd import jsonl as busd_jsonl
from busd import serve as busd_serve

from ._abuse_support import (
    LineReader,
    check_http_replies,
    check_jsonl_replies,
    check_replies,
    connect,
    growth_mib,
    http_request,
    http_roundtrip,
    memory,
    probing,
    raise_fd_limit,
    read_until_closed,
    report,
    spawn_daemon,
    tcp_established,
)

MEMORY_BOUND_MIB = 100  # growth of the daemon's peak RSS over its RSS before an attack
PING = b'{"id":1,"method":"ping"}\n'


@pytest.fixture(autouse=True)
def _fds() -> None:
    raise_fd_limit()


async def _stats(port: int) -> dict[str, Any]:
    s = await connect(port)
    try:
        reply = await LineReader(s).call("stats")
    finally:
        await s.aclose()
    return reply["result"]


async def _wait_connections(port: int, want: int, timeout: float = 5.0) -> int:
    """Poll stats until connections_open == want (counting the one asking)."""
    open_ = -1
    with trio.move_on_after(timeout):
        while True:
            try:
                open_ = (await _stats(port))["connections_open"] - 1
            except (trio.BrokenResourceError, EOFError):
                open_ = -1  # refused: the daemon is still full
            if open_ == want:
                return open_
            await trio.sleep(0.05)
    return open_


# ---- connection floods -------------------------------------------------------


async def test_connection_flood_beyond_max_connections_is_refused_cleanly(tmp_path: Any) -> None:
    cap = 64
    flood = 2000
    async with spawn_daemon(str(tmp_path / "bus.db"), "--max-connections", str(cap)) as d:
        before = memory(d.pid)
        holders: list[tuple[trio.SocketStream, LineReader]] = []
        try:
            async with probing(d.port) as probe:  # 2 connections
                for _ in range(cap - 2):
                    s = await connect(d.port)
                    r = LineReader(s)
                    assert "result" in await r.call("ping")
                    holders.append((s, r))
                assert await _wait_connections_from(holders[0][1], cap)
                outcomes: dict[str, int] = {}
                t0 = time.perf_counter()

                async def knock() -> None:
                    try:
                        s = await connect(d.port)
                    except OSError:
                        outcomes["connect failed"] = outcomes.get("connect failed", 0) + 1
                        return
                    try:
                        try:
                            await s.send_all(PING)
                        except trio.BrokenResourceError:
                            pass
                        data, how = await read_until_closed(s, timeout=5.0)
                    finally:
                        await s.aclose()
                    key = how if not data else f"answered ({how})"
                    outcomes[key] = outcomes.get(key, 0) + 1

                for _ in range(flood // 200):
                    async with trio.open_nursery() as n:
                        for _ in range(200):
                            n.start_soon(knock)
                flood_s = time.perf_counter() - t0
                # existing clients unaffected
                for s, r in holders:
                    assert "result" in await r.call("ping", rid=2)
                at_cap = await _wait_connections_from(holders[0][1], cap)
            after = memory(d.pid)
            # the slots come back when clients leave
            for s, _ in holders[:10]:
                await s.aclose()
            del holders[:10]
            assert await _wait_connections(d.port, cap - 2 - 10) == cap - 12
            for _ in range(10):
                s = await connect(d.port)
                r = LineReader(s)
                assert "result" in await r.call("ping")
                holders.append((s, r))
        finally:
            for s, _ in holders:
                await s.aclose()
        report(
            "connection flood",
            max_connections=cap,
            flood=flood,
            flood_s=f"{flood_s:.2f}",
            outcomes=outcomes,
            rss_before=before,
            rss_after=after,
            growth_mib=f"{growth_mib(before, after):.1f}",
            probe=probe.summary(),
        )
        assert at_cap
        assert set(outcomes) <= {"eof", "reset"}, outcomes  # refused: closed, nothing said, nothing hung
        assert sum(outcomes.values()) == flood
        assert any("refused" in line for line in d.lines)
        probe.check()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB
        assert d.alive()


async def _wait_connections_from(r: LineReader, want: int, timeout: float = 5.0) -> bool:
    with trio.move_on_after(timeout):
        while True:
            stats = (await r.call("stats", rid=99))["result"]
            if stats["connections_open"] == want:
                return True
            await trio.sleep(0.05)
    return False


async def test_thousands_of_idle_connections(tmp_path: Any) -> None:
    silent, jsonl, http = 1000, 500, 500
    total = silent + jsonl + http
    async with spawn_daemon(str(tmp_path / "bus.db")) as d:
        before = memory(d.pid)
        streams: list[trio.SocketStream] = []
        try:
            async with probing(d.port) as probe:
                t0 = time.perf_counter()
                for _ in range(silent):
                    streams.append(await connect(d.port))

                async def talk(s: trio.SocketStream, kind: str) -> None:
                    if kind == "jsonl":
                        assert "result" in await LineReader(s).call("ping")
                    else:
                        status, _, _ = await http_roundtrip(s, bytearray(), http_request("GET", "/healthz"))
                        assert status == 200

                for kind, count in (("jsonl", jsonl), ("http", http)):
                    for batch in range(0, count, 100):
                        async with trio.open_nursery() as n:
                            for _ in range(min(100, count - batch)):
                                s = await connect(d.port)
                                streams.append(s)
                                n.start_soon(talk, s, kind)
                open_s = time.perf_counter() - t0
                assert await _wait_connections(d.port, total + 2) == total + 2
                during = memory(d.pid)
                await trio.sleep(1.0)  # the probe keeps going while they all sit there
            after = memory(d.pid)
            for s in streams:
                await s.aclose()
            streams.clear()
            assert await _wait_connections(d.port, 0) == 0
            released = memory(d.pid)
        finally:
            for s in streams:
                await s.aclose()
        report(
            "idle connections",
            idle=total,
            silent=silent,
            jsonl=jsonl,
            http=http,
            open_s=f"{open_s:.2f}",
            rss_before=before,
            rss_with_all_open=during,
            rss_after_release=released,
            growth_mib=f"{growth_mib(before, after):.1f}",
            per_conn_kib=f"{(during.rss_kb - before.rss_kb) / total:.1f}",
            probe=probe.summary(),
        )
        probe.check()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB
        assert d.alive()


async def test_idle_connections_are_closed_after_their_timeouts(start_bus: Any, monkeypatch: Any) -> None:
    """In process, with the idle timeouts shortened: a silent connection, an
    idle JSON-lines one and an idle HTTP keep-alive one are closed; one with a
    long-poll in flight is not idle and gets its answer first."""
    monkeypatch.setattr(busd_serve, "SNIFF_TIMEOUT", 0.5)
    monkeypatch.setattr(busd_jsonl, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(busd_http, "IDLE_TIMEOUT", 0.5)
    bus = await start_bus()
    results: dict[str, tuple[float, bytes, str]] = {}

    async def watch(name: str, first: bytes) -> None:
        s = await connect(bus.port)
        try:
            t0 = trio.current_time()
            if first:
                await s.send_all(first)
            data, how = await read_until_closed(s, timeout=5.0)
            results[name] = (trio.current_time() - t0, data, how)
        finally:
            await s.aclose()

    long_poll = b'{"id":1,"method":"inbox","params":{"agent":"sleeper","wait":1.5}}\n'
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(watch, "silent", b"")
            n.start_soon(watch, "jsonl", PING)
            n.start_soon(watch, "http", http_request("GET", "/healthz"))
            n.start_soon(watch, "long-poll", long_poll)
    report("idle timeouts", **{k: f"{v[0]:.2f}s/{v[2]}" for k, v in results.items()})
    for name, (elapsed, data, how) in results.items():
        assert how == "eof", (name, how)
    assert results["silent"][1] == b"" and 0.4 < results["silent"][0] < 3.0
    assert [r["result"]["pong"] for r in check_jsonl_replies(results["jsonl"][1])] == [True]
    assert 0.4 < results["jsonl"][0] < 3.0
    # busd says 408 before closing an idle keep-alive connection (a silent
    # close would spare a client that races the timeout a stray 408)
    assert check_http_replies(results["http"][1]) in ([200], [200, 408])
    assert 0.4 < results["http"][0] < 3.0
    (reply,) = check_jsonl_replies(results["long-poll"][1])
    assert reply["result"] == {"agent": "sleeper", "messages": []}
    assert 1.5 + 0.4 < results["long-poll"][0] < 4.0  # answered at 1.5 s, closed idle after


async def test_a_json_line_that_never_ends_is_cut_after_line_timeout(start_bus: Any, monkeypatch: Any) -> None:
    """A client that keeps a line open by trickling bytes is never idle, so
    the idle timeout does not reach it; LINE_TIMEOUT does: the line gets an
    error reply and the connection closes. A slow line that does end in time
    is answered as usual, and everyone else is served meanwhile."""
    monkeypatch.setattr(busd_jsonl, "LINE_TIMEOUT", 1.0)
    bus = await start_bus()

    async def trickler() -> tuple[float, bytes, str]:
        s = await connect(bus.port)
        try:
            t0 = trio.current_time()
            await s.send_all(PING + b'{"id":2,"method":')
            async with trio.open_nursery() as n:

                async def drip() -> None:
                    for _ in range(100):
                        await trio.sleep(0.1)
                        try:
                            await s.send_all(b" ")
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return

                n.start_soon(drip)
                data, how = await read_until_closed(s, timeout=8.0)
                n.cancel_scope.cancel()
            return trio.current_time() - t0, data, how
        finally:
            await s.aclose()

    async def slow_but_finished() -> Any:
        s = await connect(bus.port)
        try:
            for ch in PING:  # 0.6 s for the whole line: within LINE_TIMEOUT
                await s.send_all(bytes([ch]))
                await trio.sleep(0.6 / len(PING))
            return json.loads(await LineReader(s).line())
        finally:
            await s.aclose()

    out: dict[str, Any] = {}
    with trio.fail_after(15):
        async with trio.open_nursery() as n:

            async def run(name: str, fn: Any) -> None:
                out[name] = await fn()

            n.start_soon(run, "trickler", trickler)
            n.start_soon(run, "slow", slow_but_finished)
    elapsed, data, how = out["trickler"]
    report("never-ending line", cut_after_s=f"{elapsed:.2f}", how=how)
    assert how == "eof", how
    first, cut = check_jsonl_replies(data)
    assert first["result"]["pong"] is True  # the complete line before it was answered
    assert cut["id"] is None and cut["error"]["code"] == -32600
    assert cut["error"]["data"]["reason"] == "bad_request" and "not received within" in cut["error"]["message"]
    assert 0.9 < elapsed < 4.0, elapsed
    assert out["slow"]["result"]["pong"] is True


# ---- slowloris -----------------------------------------------------------------


async def test_http_slowloris_is_cut_off(tmp_path: Any) -> None:
    request_timeout = 2.0
    heads, bodies, jsonl_trickle = 250, 50, 20
    async with spawn_daemon(str(tmp_path / "bus.db"), patches={"busd.http.REQUEST_TIMEOUT": request_timeout}) as d:
        before = memory(d.pid)
        results: list[tuple[str, float, bytes, str]] = []

        async def loris(kind: str) -> None:
            s = await connect(d.port)
            try:
                if kind == "head":
                    first, drip = b"GET /healthz HTTP/1.1\r\nHost: busd\r\n", b"X-Slow: " + b"a" * 10_000
                else:
                    first = b"POST /api/send HTTP/1.1\r\nHost: busd\r\nContent-Length: 100000\r\n\r\n"
                    drip = b'{"from":"a","to":"b","body":"' + b"x" * 99_000
                t0 = trio.current_time()
                await s.send_all(first)
                async with trio.open_nursery() as n:

                    async def trickle() -> None:
                        for i in range(len(drip)):
                            await trio.sleep(0.25)
                            try:
                                await s.send_all(drip[i : i + 1])
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                return

                    n.start_soon(trickle)
                    data, how = await read_until_closed(s, timeout=request_timeout + 6)
                    n.cancel_scope.cancel()
                results.append((kind, trio.current_time() - t0, data, how))
            finally:
                await s.aclose()

        jsonl_alive: list[bool] = []

        async def jsonl_loris() -> None:
            # A slow JSON line that ends within LINE_TIMEOUT (60 s) is not
            # cut; it must not disturb anyone.
            s = await connect(d.port)
            try:
                await s.send_all(b'{"id":1,')
                for ch in b'"method":"ping"':
                    await trio.sleep(0.2)
                    await s.send_all(bytes([ch]))
                await s.send_all(b"}\n")
                data = await LineReader(s).line()
                jsonl_alive.append(json.loads(data)["result"]["pong"])
            finally:
                await s.aclose()

        async with probing(d.port) as probe:
            with trio.fail_after(request_timeout + 15):
                async with trio.open_nursery() as n:
                    # arriving over a second, as a real attack would
                    kinds = ["head"] * heads + ["body"] * bodies + ["jsonl"] * jsonl_trickle
                    random.Random(7).shuffle(kinds)
                    for kind in kinds:
                        n.start_soon(jsonl_loris) if kind == "jsonl" else n.start_soon(loris, kind)
                        await trio.sleep(1.0 / len(kinds))
        after = memory(d.pid)
        durations = sorted(r[1] for r in results)
        report(
            "slowloris",
            connections=heads + bodies,
            request_timeout_s=request_timeout,
            cut_after_s=f"min={durations[0]:.2f} max={durations[-1]:.2f}",
            outcomes={h: sum(1 for r in results if r[3] == h) for h in {r[3] for r in results}},
            rss_before=before,
            rss_after=after,
            growth_mib=f"{growth_mib(before, after):.1f}",
            probe=probe.summary(),
            slow=probe.slow,
        )
        assert len(results) == heads + bodies
        for kind, elapsed, data, how in results:
            assert how in ("eof", "reset"), (kind, how)
            assert elapsed < request_timeout + 3.0, (kind, elapsed)
            if data:  # the answer, when the client can still read it, is a 408
                assert check_http_replies(data) == [408], (kind, data[:200])
        assert jsonl_alive == [True] * jsonl_trickle
        probe.check()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB
        assert d.alive()


# ---- garbage ---------------------------------------------------------------------


async def test_random_binary_and_a_line_without_end(tmp_path: Any) -> None:
    rng = random.Random(20261124)
    payloads = [rng.randbytes(rng.randint(1, 64 * 1024)) for _ in range(150)]
    payloads += [b"{" + rng.randbytes(rng.randint(1, 64 * 1024)) for _ in range(50)]
    huge = 8 * 1024 * 1024
    async with spawn_daemon(str(tmp_path / "bus.db")) as d:
        before = memory(d.pid)
        kinds: dict[str, int] = {}
        endless: list[tuple[str, int, bytes, str]] = []

        async def garbage(payload: bytes) -> None:
            s = await connect(d.port)
            try:
                async with trio.open_nursery() as n:
                    got: list[tuple[bytes, str]] = []

                    async def reader() -> None:
                        got.append(await read_until_closed(s, timeout=10))

                    n.start_soon(reader)
                    try:
                        await s.send_all(payload)
                        await s.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                data, how = got[0]
                assert how in ("eof", "reset"), how
                if how == "eof":
                    kind = check_replies(payload, data)
                else:  # cut off while we still wrote: whatever came is whole
                    kind = "reset"
                kinds[kind] = kinds.get(kind, 0) + 1
            finally:
                await s.aclose()

        async def endless_line(kind: str) -> None:
            if kind == "jsonl":
                first, fill = b'{"method":"send","params":{"body":"', b"a"
            elif kind == "http-head":
                first, fill = b"GET /healthz HTTP/1.1\r\nX-Long: ", b"b"
            else:
                first = b"POST /api/send HTTP/1.1\r\nHost: busd\r\nTransfer-Encoding: chunked\r\n\r\n"
                fill = b"1000\r\n" + b"c" * 0x1000 + b"\r\n"
            s = await connect(d.port)
            sent = 0
            try:
                async with trio.open_nursery() as n:
                    got: list[tuple[bytes, str]] = []

                    async def reader() -> None:
                        got.append(await read_until_closed(s, timeout=15))
                        n.cancel_scope.cancel()

                    n.start_soon(reader)
                    chunk = fill * (65536 // len(fill))
                    try:
                        await s.send_all(first)
                        while sent < huge:
                            await s.send_all(chunk)
                            sent += len(chunk)
                        await trio.sleep_forever()  # no newline, ever: the daemon must end it
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        await trio.sleep_forever()
                data, how = got[0]
                endless.append((kind, sent, data, how))
            finally:
                await s.aclose()

        async with probing(d.port) as probe:
            with trio.fail_after(40):
                async with trio.open_nursery() as n:
                    for kind in ("jsonl", "jsonl", "http-head", "http-body"):
                        n.start_soon(endless_line, kind)
                    for i in range(0, len(payloads), 20):
                        async with trio.open_nursery() as batch:
                            for p in payloads[i : i + 20]:
                                batch.start_soon(garbage, p)
        after = memory(d.pid)
        report(
            "garbage",
            random_connections=len(payloads),
            random_mib=f"{sum(map(len, payloads)) / 2**20:.1f}",
            by_protocol=kinds,
            endless=[(k, f"{s / 2**20:.1f}MiB sent", how, data[:60]) for k, s, data, how in endless],
            rss_before=before,
            rss_after=after,
            growth_mib=f"{growth_mib(before, after):.1f}",
            probe=probe.summary(),
        )
        assert sum(kinds.values()) == len(payloads)
        assert len(endless) == 4
        for kind, sent, data, how in endless:
            assert how in ("eof", "reset"), (kind, how)
            assert sent < huge, f"{kind}: the daemon took {sent} bytes without a newline"
            if how == "eof" or data:
                if kind == "jsonl":
                    (reply,) = check_jsonl_replies(data)
                    assert reply["error"]["data"]["reason"] == "too_large"
                else:
                    assert check_http_replies(data)[-1] in (400, 413, 431), (kind, data[:200])
        probe.check()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB
        assert d.alive()


async def test_partial_lines_cost_at_most_about_a_line_each(tmp_path: Any) -> None:
    """The daemon's memory bound under unfinished input: each connection
    holds at most one line (1 MiB) it cannot yet parse. With the default
    --max-connections 4096 that is ~4 GiB in the worst case; these figures say
    how close to linear it is."""
    conns = 100
    part = b'{"id":1,"method":"send","params":{"body":"' + b"a" * (1024 * 1024 - 100)  # no newline
    async with spawn_daemon(str(tmp_path / "bus.db")) as d:
        before = memory(d.pid)
        streams: list[trio.SocketStream] = []
        try:
            async with probing(d.port) as probe:
                for _ in range(conns):
                    s = await connect(d.port)
                    streams.append(s)
                    await s.send_all(part)
                await trio.sleep(0.5)
                held = memory(d.pid)
                # all still open (nothing over the limit), and all still usable
                for s in streams[:10]:
                    await s.send_all(b'"}}\n{"id":2,"method":"ping"}\n')
                    r = LineReader(s)
                    first = json.loads(await r.line())
                    assert first["error"]["data"]["reason"] == "bad_request"  # from/to missing
                    assert json.loads(await r.line())["result"]["pong"] is True
        finally:
            for s in streams:
                await s.aclose()
        per_conn = (held.rss_kb - before.rss_kb) / 1024 / conns
        report(
            "partial lines",
            connections=conns,
            line_kib=len(part) // 1024,
            rss_before=before,
            rss_holding=held,
            per_connection_mib=f"{per_conn:.2f}",
            worst_case_at_4096_gib=f"{per_conn * 4096 / 1024:.1f}",
            probe=probe.summary(),
        )
        assert per_conn < 1.6  # one line's worth (plus buffer slack), not more
        probe.check()
        assert d.alive()


# ---- clients that do not read ----------------------------------------------------


async def test_pipelining_client_that_never_reads_is_dropped(tmp_path: Any) -> None:
    """Pipelined sends (writes), reads (inbox, ping) and HTTP requests from
    clients that never read a reply: the daemon stops reading from them
    (bounded buffers), drops them after WRITE_TIMEOUT, and serves everyone
    else meanwhile."""
    write_timeout = 3.0
    patches = {"busd.jsonl.WRITE_TIMEOUT": write_timeout, "busd.http.WRITE_TIMEOUT": write_timeout}
    async with spawn_daemon(str(tmp_path / "bus.db"), "--direct-per-minute", "0", patches=patches) as d:
        before = memory(d.pid)
        line = json.dumps({"id": 1, "method": "send", "params": {"from": "firehose", "to": "sink", "body": "x" * 200}})
        jsonl_chunk = (line + "\n").encode() * 500
        reads = b'{"id":2,"method":"inbox","params":{"agent":"sink","limit":5}}\n{"id":3,"method":"ping"}\n'
        reads_chunk = reads * 500
        http_chunk = http_request("GET", "/healthz") * 500
        outcome: dict[str, tuple[int, float, str]] = {}

        async def firehose(name: str, chunk: bytes) -> None:
            """Write requests for as long as the daemon takes them (one
            socket send at a time, so a timed-out attempt leaves no half
            line); never read. Ends when the daemon drops the connection."""
            s = await connect(d.port)
            sent = 0
            last_progress = trio.current_time()
            how = "still open"
            view = memoryview(chunk)
            try:
                with trio.move_on_after(write_timeout + 20):
                    while True:
                        n = 0
                        with trio.move_on_after(0.2):
                            try:
                                n = await s.socket.send(view[sent % len(chunk) :])
                            except OSError:
                                how = "dropped"
                                break
                        if n:
                            sent += n
                            last_progress = trio.current_time()
                            assert sent < 256 * 2**20, "the daemon keeps reading from a client that never reads"
                        elif not tcp_established(s):
                            how = "dropped"
                            break
            finally:
                outcome[name] = (sent, trio.current_time() - last_progress, how)
                await s.aclose()

        async with probing(d.port) as probe, trio.open_nursery() as n:
            n.start_soon(firehose, "jsonl-sends", jsonl_chunk)
            n.start_soon(firehose, "jsonl-reads", reads_chunk)
            n.start_soon(firehose, "http-gets", http_chunk)
        after = memory(d.pid)
        stats = await _stats(d.port)
        report(
            "non-reading clients",
            write_timeout_s=write_timeout,
            outcome={
                k: (f"{s / 2**20:.1f}MiB sent", f"{h} {t:.1f}s after the daemon stopped reading")
                for k, (s, t, h) in outcome.items()
            },
            requests_seen=stats["requests"],
            rss_before=before,
            rss_after=after,
            growth_mib=f"{growth_mib(before, after):.1f}",
            probe=probe.summary(),
        )
        for name, (sent, after_stall, how) in outcome.items():
            assert how == "dropped", (name, how)
            assert after_stall < write_timeout + 10, (name, after_stall)
        assert any("does not read its replies" in line for line in d.lines)
        probe.check()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB
        assert d.alive()


async def test_pipelining_fat_reads_that_are_never_read_keep_memory_bounded(tmp_path: Any) -> None:
    """An inbox reply may be limit x max-body (~64 MiB): replies held for a
    client are bounded in bytes (sockio.OUT_MAX), not only in number."""
    write_timeout = 20.0
    stop_at_mib = 300  # end the attack early once the bound is clearly broken
    patches = {"busd.jsonl.WRITE_TIMEOUT": write_timeout}
    async with spawn_daemon(str(tmp_path / "bus.db"), "--direct-per-minute", "0", patches=patches) as d:
        # an inbox whose every read answers ~6 MiB (100 messages of 60 KiB)
        s = await connect(d.port)
        r = LineReader(s)
        for i in range(100):
            reply = await r.call("send", {"from": "filler", "to": "big", "body": "y" * 60_000}, rid=i)
            assert "result" in reply, reply
        await s.aclose()
        before = memory(d.pid)
        line = b'{"id":1,"method":"inbox","params":{"agent":"big","limit":1000}}\n'
        peak = before
        sent = 0
        t0 = trio.current_time()
        async with probing(d.port) as probe:
            s = await connect(d.port)
            try:
                with trio.move_on_after(write_timeout + 10):
                    while growth_mib(before, peak) < stop_at_mib and d.alive():
                        with trio.move_on_after(0.2):
                            sent += await s.socket.send(line)
                        peak = memory(d.pid)
            except OSError:
                pass  # dropped
            finally:
                await s.aclose()
        elapsed = trio.current_time() - t0
        after = memory(d.pid)
        report(
            "non-reading reader of fat replies",
            attack_s=f"{elapsed:.1f}",
            requests_sent=sent // len(line),
            reply_mib=f"{100 * 60_000 / 2**20:.1f}",
            rss_before=before,
            rss_peak=after,
            growth_mib=f"{growth_mib(before, after):.1f}",
            probe=probe.summary(),
        )
        assert d.alive()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB


# ---- broadcast storm ----------------------------------------------------------------


async def test_broadcast_storm_is_rate_limited_and_others_flow(tmp_path: Any) -> None:
    per_minute = 5
    storm_jsonl, storm_http = 3000, 200
    agents = "looper,w1,w2,w3"
    async with spawn_daemon(
        str(tmp_path / "bus.db"), "--broadcast-per-minute", str(per_minute), "--agents", agents
    ) as d:
        before = memory(d.pid)
        accepted: list[int] = []
        refused: dict[str, int] = {}
        retry_after: list[float] = []
        worker_ok: list[float] = []

        async def storm_jsonl_() -> None:
            s = await connect(d.port)
            try:
                async with trio.open_nursery() as n:

                    async def writer() -> None:
                        for i in range(storm_jsonl):
                            msg = {
                                "id": i,
                                "method": "send",
                                "params": {"from": "looper", "to": "ALL", "body": f"again {i}"},
                            }
                            await s.send_all(json.dumps(msg).encode() + b"\n")

                    n.start_soon(writer)
                    reader = LineReader(s)
                    for _ in range(storm_jsonl):
                        reply = json.loads(await reader.line())
                        if "result" in reply:
                            accepted.append(reply["result"]["id"])
                        else:
                            reason = reply["error"]["data"]["reason"]
                            refused[reason] = refused.get(reason, 0) + 1
                            retry_after.append(reply["error"]["data"].get("retry_after", 0))
            finally:
                await s.aclose()

        async def storm_http_() -> None:
            s = await connect(d.port)
            buf = bytearray()
            try:
                for i in range(storm_http):
                    body = json.dumps({"from": "looper", "to": "ALL", "body": f"http {i}"}).encode()
                    status, headers, payload = await http_roundtrip(s, buf, http_request("POST", "/api/send", body))
                    obj = json.loads(payload)
                    if status == 200:
                        accepted.append(obj["id"])
                    else:
                        assert status == 429 and int(headers["retry-after"]) >= 1, (status, headers)
                        refused[obj["error"]["code"]] = refused.get(obj["error"]["code"], 0) + 1
                        retry_after.append(obj["error"]["retry_after"])
            finally:
                await s.aclose()

        async def worker() -> None:
            # other agents' traffic: w1 -> w2 direct sends, timed
            s = await connect(d.port)
            r = LineReader(s)
            try:
                for i in range(40):
                    t = time.perf_counter()
                    reply = await r.call("send", {"from": "w1", "to": "w2", "body": f"work {i}"}, rid=i)
                    assert "result" in reply, reply
                    worker_ok.append(time.perf_counter() - t)
                    await trio.sleep(0.02)
            finally:
                await s.aclose()

        t0 = time.perf_counter()
        async with probing(d.port) as probe:
            with trio.fail_after(40):
                async with trio.open_nursery() as n:
                    n.start_soon(storm_jsonl_)
                    n.start_soon(storm_http_)
                    n.start_soon(worker)
        storm_s = time.perf_counter() - t0
        after = memory(d.pid)
        # what landed: w2's inbox holds exactly the accepted broadcasts and w1's work
        s = await connect(d.port)
        try:
            inbox = (await LineReader(s).call("inbox", {"agent": "w2", "limit": 1000}))["result"]["messages"]
        finally:
            await s.aclose()
        report(
            "broadcast storm",
            attempts=storm_jsonl + storm_http,
            storm_s=f"{storm_s:.2f}",
            accepted=len(accepted),
            refused=refused,
            retry_after_s=f"{min(retry_after):.2f}..{max(retry_after):.2f}",
            worker_sends=len(worker_ok),
            worker_max_ms=f"{max(worker_ok) * 1000:.1f}",
            rss_before=before,
            rss_after=after,
            growth_mib=f"{growth_mib(before, after):.1f}",
            probe=probe.summary(),
        )
        allowed = per_minute + int(storm_s * per_minute / 60) + 1
        assert per_minute <= len(accepted) <= allowed, (len(accepted), allowed)
        assert refused == {"rate_limited": storm_jsonl + storm_http - len(accepted)}
        assert min(retry_after) > 0
        assert len(worker_ok) == 40 and max(worker_ok) < 1.0
        from_looper = sorted(m["id"] for m in inbox if m["from"] == "looper")
        assert from_looper == sorted(accepted)
        assert all(m["to"] == "ALL" for m in inbox if m["from"] == "looper")
        assert [m["body"] for m in inbox if m["from"] == "w1"] == [f"work {i}" for i in range(40)]
        probe.check()
        assert growth_mib(before, after) < MEMORY_BOUND_MIB
        assert d.alive()
