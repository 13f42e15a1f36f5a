"""Fixtures: a real daemon (app.run) on a loopback port with a real SQLite
file in tmp_path, and raw clients for both transports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from busd import app
from busd.config import Config, load

from .wireclients import HttpClient, JsonLinesClient, Transport, http_transport, jsonl_transport


StartBus = Callable[..., Awaitable[app.Endpoints]]
BusSession = Callable[..., AbstractAsyncContextManager[app.Endpoints]]
Connect = Callable[[int], AbstractAsyncContextManager[Transport]]


def make_config(db_path: str, settings: dict[str, Any]) -> Config:
    overrides = {k.replace("_", "-"): v for k, v in settings.items()}
    overrides.setdefault("db", db_path)
    overrides.setdefault("port", 0)
    return load(None, overrides)


@pytest.fixture
def db_path(tmp_path: Any) -> str:
    return str(tmp_path / "bus.db")


@pytest.fixture
async def start_bus(nursery: trio.Nursery, db_path: str) -> StartBus:
    """``await start_bus(**settings)`` runs a daemon (settings in kebab-case
    or snake_case) and returns its Endpoints. Stopped when the test ends."""

    async def start(**settings: Any) -> app.Endpoints:
        return await nursery.start(partial(app.run, make_config(db_path, settings)))

    return start


@pytest.fixture
def bus_session(db_path: str) -> BusSession:
    """``async with bus_session(**settings) as endpoints:`` runs a daemon for
    the block and stops it cleanly (``app.run``'s ``stop``, as on SIGTERM)
    when the block ends; the next session may reopen the same database.
    Close clients first: open connections get a grace period on shutdown."""

    @asynccontextmanager
    async def session(**settings: Any) -> AsyncIterator[app.Endpoints]:
        stop = trio.Event()
        async with trio.open_nursery() as n:
            try:
                yield await n.start(partial(app.run, make_config(db_path, settings), stop=stop))
            finally:
                stop.set()

    return session


@pytest.fixture
async def bus(start_bus: StartBus) -> app.Endpoints:
    return await start_bus()


@pytest.fixture
async def jl(bus: app.Endpoints) -> Any:
    async with JsonLinesClient(bus.port) as c:
        yield c


@pytest.fixture
async def http(bus: app.Endpoints) -> Any:
    async with HttpClient(bus.port) as c:
        yield c


@pytest.fixture(params=["jsonl", "http"])
def connect(request: Any) -> Connect:
    """``async with connect(port) as t:`` a Transport of the test's kind; a
    test using it runs once over JSON lines and once over HTTP."""
    return jsonl_transport if request.param == "jsonl" else http_transport


@pytest.fixture
async def api(connect: Connect, bus: app.Endpoints) -> Any:
    """The same contract calls over either transport (see wireclients.Transport)."""
    async with connect(bus.port) as t:
        yield t


__all__ = ["Transport", "StartBus", "BusSession", "Connect", "make_config"]


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``slow`` run only when asked for: ``-m slow`` (or any
    ``-m`` expression). A plain run deselects them."""
    if config.getoption("markexpr", ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
