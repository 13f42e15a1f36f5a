"""Helpers for the client, outbox and CLI tests: an in-process daemon that can
be stopped and started again on the same port and database, a port that
refuses connections, the blocking client run in a worker thread, and the
``busd`` command line run as a child process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import pytest
import trio

from busd import app
from busd.config import Config, load

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run a blocking client call off the trio thread the daemon runs on."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kw))


def make_config(db: str, settings: dict[str, Any]) -> Config:
    overrides = {k.replace("_", "-"): v for k, v in settings.items()}
    overrides.setdefault("port", 0)
    return load(None, {**overrides, "db": db})


@asynccontextmanager
async def running_bus(db: str, **settings: Any) -> AsyncIterator[app.Endpoints]:
    """A daemon on ``db`` for the block. Leaving the block stops it at once
    (cancelled: connections dropped, as if it died); a later block may reuse
    the database and, with ``port=``, the port."""
    async with trio.open_nursery() as n:
        endpoints = await n.start(partial(app.run, make_config(db, settings)))
        try:
            yield endpoints
        finally:
            n.cancel_scope.cancel()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def free_port() -> int:
    """A loopback port nothing listens on now (for a daemon started later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(port: int, tmp: Any, **extra: str) -> dict[str, str]:
    """The environment of a ``busd`` child: no BUSD_* from outside, the bus
    at ``port``, the outbox (XDG state home) under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env.update(BUSD_URL=f"127.0.0.1:{port}", XDG_STATE_HOME=str(tmp), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


async def busd(*args: str, env: dict[str, str], stdin: bytes = b"", timeout: float = 20.0) -> Ran:
    """``busd ARGS`` as a child process; its exit code, stdout and stderr."""
    with trio.fail_after(timeout):
        p = await trio.run_process(
            [sys.executable, "-m", "busd", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return Ran(p.returncode, p.stdout.decode(), p.stderr.decode())


async def python(code: str, *, env: dict[str, str], timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
    """A Python child (an agent process) running ``code``."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False, env=env
        )
