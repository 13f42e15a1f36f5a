"""Run busd as a real child process (``python -m busd serve``) on a real
SQLite file, for the tests that need a process to kill, signal or restart.

    async with running_daemon(db_path, "--direct-per-minute", "0") as d:
        ...  # d.port, d.process, d.stderr_text()
        d.kill()                      # kill -9
        assert await d.wait() == -9

The child always dies with the block (SIGKILL if it is still running).
``run_to_exit`` runs a daemon that is expected to exit by itself (bad
options, unusable database) and returns its exit code and stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

START_TIMEOUT = 20.0  # seconds from spawn to the listening line (shared, loaded machine)
EXIT_TIMEOUT = 20.0  # seconds for a daemon to exit after a signal, or to fail at start-up

LISTENING = re.compile(
    r"busd listening on (?P<host>\S+):(?P<port>\d+) \((?P<what>[^)]*)\).*?; db (?P<db>.+?); auth (?P<auth>.+)$"
)


# Root ignores file permissions, so a read-only file is not read-only to a
# daemon running as root. Run that way, the child first drops the capabilities
# that let root bypass them (from its bounding set, so they stay dropped
# across exec) and then becomes busd, still uid 0 but bound by permissions.
_DROP_DAC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit("busd-test: cannot drop capability %d: %s" % (cap, os.strerror(ctypes.get_errno())))
os.execv(sys.executable, [sys.executable, "-m", "busd", *sys.argv[1:]])
"""


# Runs busd's own CLI after setting module constants given as JSON in argv[1].
_PATCHED = """\
import importlib, json, sys
for dotted, value in json.loads(sys.argv[1]).items():
    module, _, name = dotted.rpartition(".")
    mod = importlib.import_module(module)
    assert hasattr(mod, name), dotted
    setattr(mod, name, value)
from busd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def busd_command(
    db: str | None, *args: str, unprivileged: bool = False, patches: dict[str, float] | None = None
) -> list[str]:
    """``python -m busd serve [--db DB] ARGS``. ``unprivileged``: if the tests
    run as root, the daemon runs without root's power over file permissions.
    ``patches``: module constants set in the child before it starts (timing
    only, {"busd.jsonl.WRITE_TIMEOUT": 2.0}: the network and database stay real)."""
    if patches:
        assert not unprivileged, "patches and unprivileged do not combine"
        cmd = [sys.executable, "-c", _PATCHED, json.dumps(patches), "serve"]
    elif unprivileged and os.geteuid() == 0:
        cmd = [sys.executable, "-c", _DROP_DAC, "serve"]
    else:
        cmd = [sys.executable, "-m", "busd", "serve"]
    if db is not None:
        cmd += ["--db", db]
    return cmd + list(args)


def child_env(extra: dict[str, str] | None = None, *, keep_token: bool = False) -> dict[str, str]:
    """The test's environment minus any BUSD_* setting (so the outer shell
    cannot change what a test means), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class DaemonExited(Exception):
    """The daemon exited (or closed stderr) before saying it listens."""

    def __init__(self, code: int | None, stderr: str) -> None:
        super().__init__(f"busd exited ({code}) before listening:\n{stderr}")
        self.exited = Exited(code if code is not None else -1, stderr, "")


@dataclass
class Daemon:
    process: trio.Process
    db: str
    port: int = 0
    host: str = ""
    listening_line: str = ""
    lines: list[str] = field(default_factory=list)
    _listening: trio.Event = field(default_factory=trio.Event)
    _stderr_done: trio.Event = field(default_factory=trio.Event)
    _new_line: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_text(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """``kill -9``: no clean-up of any kind in the daemon."""
        self.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit code (negative: killed by that signal). Fails the test if
        the daemon does not exit in time."""
        with trio.fail_after(timeout):
            code = await self.process.wait()
            await self._stderr_done.wait()  # every log line read
        return code

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        self.send_signal(signum)
        return await self.wait(timeout)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        buf = b""
        try:
            async for chunk in self.process.stderr:
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._line(raw.decode("utf-8", "replace"))
            if buf:
                self._line(buf.decode("utf-8", "replace"))
        finally:
            self._stderr_done.set()
            self._new_line.set()

    async def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first log line (from the start) that matches ``pattern``,
        waiting for it if need be. Fails the test if none comes in time."""
        with trio.fail_after(timeout):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                seen = len(self.lines)
                if self._stderr_done.is_set():
                    raise AssertionError(f"busd exited without logging {pattern!r}:\n{self.stderr_text()}")
                await self._new_line.wait()

    def _line(self, line: str) -> None:
        self.lines.append(line)
        self._new_line.set()
        self._new_line = trio.Event()
        if not self._listening.is_set():
            m = LISTENING.search(line)
            if m:
                self.host, self.port, self.listening_line = m["host"], int(m["port"]), line
                self._listening.set()


async def _wait_listening(d: Daemon, timeout: float) -> bool:
    """True once the daemon says it listens; False if its stderr closes
    first (it exited). TooSlowError if neither happens in time."""
    with trio.fail_after(timeout):
        async with trio.open_nursery() as n:

            async def stderr_closed() -> None:
                await d._stderr_done.wait()
                n.cancel_scope.cancel()

            n.start_soon(stderr_closed)
            await d._listening.wait()
            n.cancel_scope.cancel()
    return d._listening.is_set()


def _single(eg: BaseExceptionGroup) -> BaseException | None:
    while isinstance(eg, BaseExceptionGroup) and len(eg.exceptions) == 1:
        eg = eg.exceptions[0]
    return None if isinstance(eg, BaseExceptionGroup) else eg


@asynccontextmanager
async def running_daemon(
    db: str | None,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    unprivileged: bool = False,
    patches: dict[str, float] | None = None,
    **popen: Any,
) -> AsyncIterator[Daemon]:
    """Start ``busd serve --db DB --port 0 ARGS`` (``--port`` only if ARGS do
    not name one) and yield once its first log line says where it listens.
    ``unprivileged``: see busd_command. ``popen`` goes to the process (cwd=,
    ...). On exit the child is killed if it still runs, and reaped."""
    argv = list(args)
    if not any(a == "--port" or a.startswith("--port=") for a in argv) and "--config" not in argv:
        argv += ["--port", "0"]
    cmd = busd_command(db, *argv, unprivileged=unprivileged, patches=patches)
    process = await trio.lowlevel.open_process(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env if env is not None else child_env(),
        **popen,
    )
    d = Daemon(process, db or "")
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(d._read_stderr)
                if await _wait_listening(d, timeout):
                    try:
                        yield d
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            # the reader task cannot fail; show the test's own exception bare
            inner = _single(eg)
            if inner is None:
                raise
            raise inner from None
        if not d._listening.is_set():
            with trio.move_on_after(EXIT_TIMEOUT):
                await process.wait()
            raise DaemonExited(process.returncode, d.stderr_text())
    finally:
        await reap(process)


async def reap(process: trio.Process) -> None:
    """Kill ``process`` if it still runs, wait for it (bounded), close its pipes.
    Shielded: it runs in ``finally`` blocks of cancelled tests."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(EXIT_TIMEOUT):
            await process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()


@dataclass(frozen=True)
class Exited:
    code: int
    stderr: str
    stdout: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


async def run_to_exit(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = EXIT_TIMEOUT, **popen: Any
) -> Exited:
    """Run a daemon command that must exit by itself within ``timeout``
    (killed and reaped otherwise, and the test fails)."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            list(cmd),
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env if env is not None else child_env(),
            **popen,
        )
    return Exited(done.returncode, done.stderr.decode("utf-8", "replace"), done.stdout.decode("utf-8", "replace"))


async def refused_start(db: str | None, *args: str, **kw: Any) -> Exited:
    """Start a daemon (``running_daemon`` arguments) that must refuse to
    start, and return how it exited. If it listens instead, it is killed and
    the test fails."""
    try:
        async with running_daemon(db, *args, **kw) as d:
            raise AssertionError(f"busd started although it should have refused:\n{d.stderr_text()}")
    except DaemonExited as e:
        return e.exited
    raise AssertionError("unreachable")
