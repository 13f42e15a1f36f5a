"""Crash loop: many client processes keep a real daemon busy (sends with
keys, pipelined bursts, broadcasts, inbox reads, acks, over JSON lines and
HTTP) while it is ``kill -9``ed and restarted at random moments, some of
them in the middle of its start-up. Afterwards the checker replays the
whole history against the contract (see checker.py): every acknowledged
send exists exactly once, per-sender order holds, acked messages never come
back unread, ids never go backwards.

The history (every request and reply, JSON lines) stays in the test's
tmp_path; its path is in the failure message, and
``python -m tests.faults.checker DIR`` checks it again. ``BUSD_FAULT_SEED``
replays a run's schedule of kills and operations.
"""

from __future__ import annotations

import os
import secrets

import pytest
import trio

from ._support import Plan, crash_loop, history_note


def _seed() -> str:
    return os.environ.get("BUSD_FAULT_SEED") or secrets.token_hex(4)


async def _run(tmp_path, plan: Plan, cap: float) -> None:
    dir = tmp_path / "history"
    with trio.fail_after(cap):
        report = await crash_loop(dir, str(tmp_path / "bus.db"), plan)
    print(report.figures())
    assert report.ok, f"{report.summary()}\nseed {plan.seed}; {history_note(dir)}"
    assert report.restarts == plan.restarts + 1, report.figures()
    # the load was real: every kind of operation happened, and crashes cut some short
    assert report.sends_acked >= 20 * plan.restarts and report.broadcasts and report.acks, report.figures()
    assert report.reads and report.messages_read and report.db_messages == report.sends, report.figures()


async def test_crash_loop(tmp_path):
    await _run(tmp_path, Plan(restarts=4, seed=_seed()), cap=120)


@pytest.mark.slow
async def test_crash_loop_long(tmp_path):
    await _run(tmp_path, Plan(restarts=60, seed=_seed(), workers=6), cap=900)
