"""The composition root: build everything from a Config, serve until told to
stop, then shut down in order. Nesting order is shutdown order:

    store (writer task)            closed last: commits everything queued
      maintenance                  cancelled first
      connection handlers          given a short grace to send their replies
        listeners                  closed first: nothing new comes in
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from dataclasses import dataclass

import trio

from . import db
from .config import Config, Tokens
from .core import Bus
from .errors import BusError
from .serve import Server
from .store import open_store

log = logging.getLogger(__name__)

GRACE = 2.0  # seconds for connections to send their last replies at shutdown
GC_THRESHOLDS = (10_000, 50, 1_000)  # CPython's default is (700, 10, 10)
GC_EVERY = 600.0  # seconds between full garbage collections


@dataclass(frozen=True)
class Endpoints:
    port: int
    http_port: int | None
    bus: Bus


async def run(
    config: Config,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM or SIGINT (or until ``stop`` is set), then stop
    accepting, commit and answer what is in flight, close the database."""
    tokens = Tokens.from_config(config)
    if stop is None:
        stop = trio.Event()
    async with open_store(
        config.db, inbox_cap=config.inbox_cap, strict=config.strict, synchronous=config.synchronous
    ) as store:
        bus = Bus(config, store, tokens)
        if config.agents:
            await store.execute(db.Touch({name: None for name in config.agents}))
        server = Server(bus, config.max_connections)
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as front:
                front.start_soon(_watch_signals, stop)
                front.start_soon(_collect_garbage)
                await front.start(bus.run_maintenance)
                port = await front.start(server.serve, config.host, config.port, handlers)
                http_port = None
                if config.http_port is not None:
                    http_port = await front.start(server.serve, config.host, config.http_port, handlers, True)
                log.info(
                    "busd listening on %s:%d (JSON lines and HTTP)%s; db %s; auth %s",
                    config.host,
                    port,
                    f", HTTP only on port {http_port}" if http_port is not None else "",
                    os.path.abspath(config.db),
                    _auth_mode(config, tokens),
                )
                task_status.started(Endpoints(port, http_port, bus))
                await stop.wait()
                log.info("busd stopping: no new connections")
                front.cancel_scope.cancel()
            bus.close()  # answer long-polls now
            try:
                await bus.flush_seen()
            except BusError:
                pass
            await store.drain()  # every queued write committed and answered
            handlers.cancel_scope.deadline = trio.current_time() + GRACE
    log.info("busd stopped; database closed")


def tune_gc() -> None:
    """For the daemon process. busd makes almost no cyclic garbage, yet with
    CPython's default thresholds a loaded daemon runs a full collection every
    few seconds, and with 1,000 connections open each one stops the event
    loop for 30 to 90 ms (measured: open-loop send p99 24 to 52 ms, 4 to 7 ms
    without). So: move what exists at start-up out of the collector's sight,
    collect young objects less often, and make full collections happen on a
    clock instead (``_collect_garbage``)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _collect_garbage() -> None:
    while True:
        await trio.sleep(GC_EVERY)
        t0 = time.perf_counter()
        found = gc.collect()
        log.debug("full garbage collection: %d objects freed in %.1f ms", found, (time.perf_counter() - t0) * 1000)


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("busd got %s", signal.Signals(signum).name)
            stop.set()
            return


def _auth_mode(config: Config, tokens: Tokens) -> str:
    if not tokens.required:
        return "none (open)" if config.insecure else "none (loopback only)"
    parts = []
    if config.token:
        parts.append("shared token")
    if config.tokens_file:
        parts.append(f"per-agent tokens from {config.tokens_file}")
    return " + ".join(parts)
