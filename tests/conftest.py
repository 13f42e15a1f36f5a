"""Fixtures: a real daemon (app.run) on a loopback port with a real SQLite
file in tmp_path, and raw clients for both transports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio

from busd import app
from busd.config import Config, load

from .wireclients import HttpClient, JsonLinesClient, Transport, http_transport, jsonl_transport


StartBus = Callable[..., Awaitable[app.Endpoints]]


@pytest.fixture
def db_path(tmp_path: Any) -> str:
    return str(tmp_path / "bus.db")


@pytest.fixture
async def start_bus(nursery: trio.Nursery, db_path: str) -> StartBus:
    """``await start_bus(**settings)`` runs a daemon (settings in kebab-case
    or snake_case) and returns its Endpoints. Stopped when the test ends."""

    async def start(**settings: Any) -> app.Endpoints:
        overrides = {k.replace("_", "-"): v for k, v in settings.items()}
        overrides.setdefault("db", db_path)
        overrides.setdefault("port", 0)
        config: Config = load(None, overrides)
        return await nursery.start(partial(app.run, config))

    return start


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
async def api(request: Any, bus: app.Endpoints) -> Any:
    """The same contract calls over either transport (see wireclients.Transport)."""
    factory = jsonl_transport if request.param == "jsonl" else http_transport
    async with factory(bus.port) as t:
        yield t


__all__ = ["Transport", "StartBus"]
