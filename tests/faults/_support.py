"""What the fault tests share: mounts (tmpfs, the power-loss FUSE file
system), and the crash-loop harness that drives client processes against a
daemon it keeps killing.

The daemon itself is started with ``tests/daemon.py`` (a real ``busd serve``
child on a real port); nothing here talks to busd except over loopback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from ..daemon import busd_command, child_env, running_daemon
from ..wireclients import JsonLinesClient
from . import checker

HERE = Path(__file__).resolve().parent
POWERFS = HERE / "powerfs.py"
LOADWORKER = HERE / "loadworker.py"

MNT_DETACH = 2
MS_NOSUID = 2
MS_NODEV = 4
MOUNT_TIMEOUT = 20.0

# Set (to anything) where the mounts must work, e.g. in CI: a missing FUSE or
# mount permission then fails the fault tests instead of skipping them.
REQUIRE_ENV = "BUSD_FAULTS_REQUIRE_MOUNTS"


def unavailable(reason: str) -> None:
    """Skip, with the reason, unless this machine is declared able. (Call it
    from a sync fixture: pytest-trio drops the reason of a skip raised
    inside a trio test.)"""
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} (and {REQUIRE_ENV} is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tmpfs_available(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips the test where a tmpfs cannot be mounted."""
    target = tmp_path_factory.mktemp("tmpfs-probe")
    try:
        mount("tmpfs", str(target), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")
    except OSError as e:
        unavailable(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {e}")
    detach(str(target))


@pytest.fixture(scope="session")
def fuse_available(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips the test where the power-loss file system cannot be mounted."""
    if not os.path.exists("/dev/fuse"):
        unavailable("no /dev/fuse on this machine: the power-loss file system needs FUSE")
    base = tmp_path_factory.mktemp("fuse-probe")
    (base / "disk").mkdir()
    (base / "mnt").mkdir()
    p = subprocess.Popen(
        [sys.executable, "-W", "ignore", str(POWERFS), str(base / "disk"), str(base / "mnt")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([p.stdout], [], [], MOUNT_TIMEOUT)
        line = p.stdout.readline().decode().strip() if ready and p.stdout else ""
    finally:
        p.terminate()  # libfuse unmounts on SIGTERM
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        detach(str(base / "mnt"))
    if line != "ready":
        tail = " / ".join(err.decode(errors="replace").strip().splitlines()[-3:]) or f"exit {p.returncode}"
        unavailable(f"cannot mount the FUSE power-loss file system (fusepy, libfuse2, root): {tail}")


# ---- mounts ---------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {target}: {os.strerror(e)}")


def detach(target: str) -> None:
    """``umount -l``; quiet if nothing is mounted there."""
    if not is_mounted(target):
        return
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {target}: {os.strerror(e)}")


def is_mounted(target: str | Path) -> bool:
    target = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@contextmanager
def tmpfs(target: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``target`` for the life of the block (use
    the ``tmpfs_available`` fixture to skip where mounting is not allowed)."""
    target.mkdir(parents=True, exist_ok=True)
    mount("tmpfs", str(target), "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0755")
    try:
        yield target
    finally:
        detach(str(target))


class MountFailed(Exception):
    pass


class PowerFs:
    """The power-loss file system (powerfs.py) mounted at ``mountpoint`` over
    ``backing``. ``cut()`` is the power cut: the FUSE process is SIGKILLed
    (its unsynced data dies with it), the dead mount detached, and a fresh
    instance mounted on what reached the "disk"."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log
        self.proc: trio.Process | None = None
        self._buf = b""
        self.cuts = 0

    async def mount(self) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-W", "ignore", str(POWERFS), str(self.backing), str(self.mountpoint)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._buf = b""
        line = None
        with trio.move_on_after(MOUNT_TIMEOUT):
            line = await self._line()
        if line != "ready":
            await self._reap()
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise MountFailed(" / ".join(tail) or f"powerfs said {line!r}")

    async def _line(self) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode().strip()

    async def stats(self) -> dict[str, Any]:
        """fsync counts and what a cut now would drop."""
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.send_all(b"stats\n")
        with trio.fail_after(10):
            line = await self._line()
        return json.loads(line or "{}")

    async def cut(self) -> dict[str, Any]:
        """Power cut; returns what was lost (bytes and entries not synced)."""
        dropped = await self.stats()
        await self._reap()
        self.cuts += 1
        await self.mount()
        return dropped

    async def _reap(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            with trio.CancelScope(shield=True):
                if self.proc.returncode is None:
                    self.proc.send_signal(sig)
                with trio.move_on_after(10):
                    await self.proc.wait()
                if self.proc.returncode is None:
                    self.proc.kill()
                    await self.proc.wait()
                for stream in (self.proc.stdin, self.proc.stdout):
                    if stream is not None:
                        await stream.aclose()
        detach(str(self.mountpoint))

    async def close(self) -> None:
        await self._reap(signal.SIGTERM)


@asynccontextmanager
async def power_fs(base: Path) -> AsyncIterator[PowerFs]:
    """A mounted PowerFs under ``base``, always unmounted at the end (use
    the ``fuse_available`` fixture to skip where FUSE cannot work)."""
    fs = PowerFs(base / "disk", base / "mnt", base / "powerfs.log")
    try:
        await fs.mount()
        yield fs
    finally:
        await fs.close()


# ---- the crash loop ---------------------------------------------------------------

DAEMON_ARGS = ("--direct-per-minute", "0", "--broadcast-per-minute", "0")


@dataclass
class Plan:
    """How a crash loop runs. ``restarts`` kills under load; one more kill
    (after the clients stop) precedes the final reads."""

    restarts: int
    seed: str
    workers: int = 4
    agents: int = 3
    up: tuple[float, float] = (0.3, 1.5)  # seconds a daemon serves before its kill -9
    startup_kills: float = 0.15  # share of restarts preceded by a kill during start-up
    tail: float = 0.7  # seconds of load after the last restart
    warm_up: float = 0.8  # extra seconds for the first daemon: the clients are starting
    daemon_args: Sequence[str] = DAEMON_ARGS
    worker_seconds: float = 900.0  # a worker's hard stop, whatever happens


@dataclass
class Events:
    path: Path
    lines: list[str] = field(default_factory=list)

    def write(self, ev: str, **fields: Any) -> None:
        rec = {"t": round(time.monotonic(), 6), "ev": ev, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _write_port(dir: Path, port: int, gen: int) -> None:
    tmp = dir / "port.json.tmp"
    tmp.write_text(json.dumps({"port": port, "gen": gen}))
    os.replace(tmp, dir / "port.json")


async def _last_id(port: int) -> int:
    with trio.fail_after(20):
        async with JsonLinesClient(port) as c:
            reply = await c.call("stats")
    return int(reply["result"]["last_id"])


async def crash_loop(
    dir: Path,
    db: str,
    plan: Plan,
    *,
    cut: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> checker.Report:
    """Run ``plan`` against ``busd serve --db DB``: client processes under
    load, the daemon killed (``kill -9``, then ``cut()`` if given: a power
    cut) and restarted at random moments; then the clients stop, one last
    kill, the final reads, a clean SIGTERM. Returns the checker's report on
    the history left in ``dir``."""
    dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(plan.seed)
    events = Events(dir / "events.jsonl")
    events.write("plan", seed=plan.seed, restarts=plan.restarts, workers=plan.workers, db=db,
                 args=list(plan.daemon_args), powercut=cut is not None)
    workers: list[trio.Process] = []
    logs = []
    how = "powercut" if cut is not None else "kill9"

    async def crash(d: Any, gen: int) -> None:
        events.write("kill", gen=gen, how=how, pid=d.pid)
        d.kill()
        await d.wait()
        if cut is not None:
            events.write("cut", gen=gen, dropped=await cut())
        (dir / f"daemon-g{gen}.log").write_text(d.stderr_text())

    try:
        for gen in range(plan.restarts + 2):
            final = gen == plan.restarts + 1
            if gen and not final and rng.random() < plan.startup_kills:
                # kill -9 while it opens (and recovers) the database
                early = await trio.lowlevel.open_process(
                    busd_command(db, "--port", "0", *plan.daemon_args),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env=child_env(),
                )
                try:
                    await trio.sleep(rng.uniform(0.0, 0.5))
                finally:
                    early.kill()
                    with trio.CancelScope(shield=True):
                        await early.wait()
                events.write("startup-kill", gen=gen)
                if cut is not None:
                    events.write("cut", gen=gen, dropped=await cut())
            async with running_daemon(db, *plan.daemon_args) as d:
                _write_port(dir, d.port, gen)
                events.write("up", gen=gen, pid=d.pid, port=d.port)
                if gen:
                    events.write("restarted", gen=gen, last_id=await _last_id(d.port))
                if gen == 0:
                    for w in range(plan.workers):
                        log = open(dir / f"worker-{w}.log", "wb")
                        logs.append(log)
                        workers.append(await trio.lowlevel.open_process(
                            [sys.executable, str(LOADWORKER), "--dir", str(dir), "--worker", str(w),
                             "--workers", str(plan.workers), "--agents", str(plan.agents), "--seed", plan.seed,
                             "--seconds", str(plan.worker_seconds)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                        ))
                if gen == 0:
                    await trio.sleep(plan.warm_up)
                if gen < plan.restarts:
                    await trio.sleep(rng.uniform(*plan.up))
                    await crash(d, gen)
                elif gen == plan.restarts:
                    await trio.sleep(plan.tail)
                    (dir / "stop").touch()
                    with trio.move_on_after(60):
                        for p in workers:
                            await p.wait()
                    events.write("workers-stopped", codes=[p.returncode for p in workers])
                    await crash(d, gen)
                else:
                    await _final_reads(dir, d.port, plan)
                    code = await d.stop()
                    events.write("stopped", gen=gen, code=code)
                    (dir / f"daemon-g{gen}.log").write_text(d.stderr_text())
                    if code != 0:
                        raise AssertionError(f"busd did not stop cleanly on SIGTERM (exit {code}):\n{d.stderr_text()}")
        for suffix in ("", "-wal"):
            if os.path.exists(db + suffix):
                shutil.copyfile(db + suffix, dir / f"final.db{suffix}")
    except BaseException as e:
        e.add_note(history_note(dir))
        raise
    finally:
        with trio.CancelScope(shield=True):
            for p in workers:
                if p.returncode is None:
                    p.kill()
                await p.wait()
            for log in logs:
                log.close()
    stuck = [w for w, p in enumerate(workers) if p.returncode != 0]
    report = checker.check(str(dir))
    if stuck:
        report.fail("client process", f"workers {stuck} exited with {[workers[w].returncode for w in stuck]}")
    return report


async def _final_reads(dir: Path, port: int, plan: Plan) -> None:
    """Every inbox, read once after the last crash, into hist-final.jsonl."""
    agents = [f"w{w}a{i}" for w in range(plan.workers) for i in range(plan.agents)]
    with open(dir / "hist-final.jsonl", "w") as f, trio.fail_after(60):
        async with JsonLinesClient(port) as c:
            for rid, agent in enumerate(agents, 1):
                params = {"agent": agent, "limit": 1000}
                f.write(json.dumps({"t": time.monotonic(), "ev": "req", "w": "final", "c": 0, "rid": rid,
                                    "m": "inbox", "p": params}) + "\n")
                reply = await c.call("inbox", params)
                rec: dict[str, Any] = {"t": time.monotonic(), "ev": "rep", "w": "final", "rid": rid,
                                       "agent": agent, "limit": 1000}
                if "result" in reply:
                    rec["r"] = reply["result"]
                else:
                    rec["e"] = reply["error"]
                f.write(json.dumps(rec) + "\n")


def history_note(dir: Path) -> str:
    return f"crash-loop history kept in {dir} (re-check: python -m tests.faults.checker {dir})"
