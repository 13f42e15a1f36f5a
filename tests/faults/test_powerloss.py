"""Power loss: ``kill -9`` never loses what SQLite handed to the OS; a
power cut loses everything that was not fsynced. The database lives on
powerfs (powerfs.py), a FUSE file system that keeps only synced data on its
"disk"; a power cut is ``kill -9`` of the daemon, then SIGKILL of the file
system process (its unsynced data dies with it), a remount, a restart.

With ``synchronous=FULL`` (the contract) every acknowledged send survives
every cut. With ``synchronous=NORMAL`` the same harness shows acknowledged
sends lost, which proves the harness can see a loss when there is one; and
NORMAL under plain ``kill -9`` loses nothing, which proves it is the cut (the
unsynced writes dropped), not the file system, that loses them.

Skipped where /dev/fuse, fusepy or libfuse2 are missing or mounting is not
allowed (see tests/deps.sh), unless BUSD_FAULTS_REQUIRE_MOUNTS is set.
"""

from __future__ import annotations

import os
import secrets

import pytest
import trio

from ._support import DAEMON_ARGS, Plan, crash_loop, fuse_available, history_note, power_fs

pytestmark = pytest.mark.usefixtures(fuse_available.__name__)


def _seed() -> str:
    return os.environ.get("BUSD_FAULT_SEED") or secrets.token_hex(4)


def _normal_args(tmp_path) -> tuple[str, ...]:
    toml = tmp_path / "normal.toml"
    toml.write_text('synchronous = "NORMAL"\n')
    return ("--config", str(toml), "--port", "0", *DAEMON_ARGS)


async def _full(tmp_path, restarts: int, cap: float) -> None:
    plan = Plan(restarts=restarts, seed=_seed(), workers=3, up=(0.4, 1.5), startup_kills=0.2)
    dir = tmp_path / "history"
    with trio.fail_after(cap):
        async with power_fs(tmp_path / "fs") as fs:
            report = await crash_loop(dir, str(fs.mountpoint / "bus.db"), plan, cut=fs.cut)
    print(report.figures())
    assert report.ok, f"{report.summary()}\nseed {plan.seed}; {history_note(dir)}"
    assert report.power_cuts == restarts + 1 and fs.cuts >= report.power_cuts, report.figures()
    assert report.sends_acked >= 10 * restarts and report.db_messages == report.sends, report.figures()


async def test_power_cuts_keep_every_acked_send(tmp_path):
    await _full(tmp_path, restarts=2, cap=150)


@pytest.mark.slow
async def test_power_cuts_keep_every_acked_send_long(tmp_path):
    await _full(tmp_path, restarts=40, cap=900)


async def test_synchronous_normal_loses_acked_sends_to_a_power_cut(tmp_path):
    args = _normal_args(tmp_path)
    with trio.fail_after(150):
        async with power_fs(tmp_path / "fs") as fs:
            # NORMAL under kill -9 alone: what SQLite handed to the OS survives
            plan = Plan(restarts=1, seed=_seed(), workers=3, up=(0.8, 1.5), startup_kills=0, daemon_args=args)
            killed = await crash_loop(tmp_path / "kill9", str(fs.mountpoint / "killed.db"), plan)
            print("NORMAL, kill -9:", killed.figures())
            assert killed.ok, f"{killed.summary()}\n{history_note(tmp_path / 'kill9')}"
            # NORMAL under power cuts: acknowledged sends are gone
            plan = Plan(restarts=1, seed=_seed(), workers=3, up=(0.8, 1.5), startup_kills=0, daemon_args=args)
            cut = await crash_loop(tmp_path / "cut", str(fs.mountpoint / "cut.db"), plan, cut=fs.cut)
    print("NORMAL, power cuts:", cut.figures())
    assert cut.lost, (
        "synchronous=NORMAL lost no acknowledged send to a power cut: the power-loss harness cannot see a loss\n"
        + cut.summary()
    )
