"""Smoke test of ``busd bench``: a few hundred messages through a real daemon
(started by the bench as a child process), and the bench's own check that
every acknowledged send arrived exactly once and in per-sender order. No
timing is asserted: the bench is a bench, not a test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from busd.bench import verify


def run_bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "busd.bench", *args, "--workers", "2", "--out", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(out.read_text())
    return result


@pytest.mark.parametrize("transport", ["jsonl", "http"])
def test_closed_loop_delivers_every_acknowledged_send(tmp_path, transport):
    r = run_bench(tmp_path, "closed", "--agents", "12", "--count", "300", "--transport", transport)
    v = r["verification"]
    assert v["ok"], v
    assert v["acked"] == v["delivered"] == 300
    assert r["errors"] == {}
    assert r["writer"]["mean_batch"] >= 1  # the daemon's stats were read


def test_open_loop_long_polls_receive_every_send(tmp_path):
    r = run_bench(tmp_path, "open", "--agents", "20", "--rate", "150", "--duration", "1", "--wait", "30")
    v = r["verification"]
    assert v["ok"], v
    assert v["acked"] > 0 and v["delivered"] == v["acked"]
    assert r["delivery_ms"]["n"] > 0


def test_verification_catches_loss_duplicates_and_reordering():
    ok = verify({("a", "b"): [1, 2, 3]}, {"b": [("a", 1), ("a", 2), ("a", 3)]})
    assert ok["ok"] and ok["delivered"] == 3
    lost = verify({("a", "b"): [1, 2, 3]}, {"b": [("a", 1), ("a", 3)]})
    assert not lost["ok"] and lost["missing"] == 1
    twice = verify({("a", "b"): [1, 2]}, {"b": [("a", 1), ("a", 2), ("a", 2)]})
    assert not twice["ok"] and twice["duplicates"] == 1
    swapped = verify({("a", "b"): [1, 2]}, {"b": [("a", 2), ("a", 1)]})
    assert not swapped["ok"] and swapped["out_of_order"] == 1
    stray = verify({("a", "b"): [1]}, {"b": [("a", 1), ("a", 9)]})
    assert not stray["ok"] and stray["unexpected"] == 1


def test_compare_runs_busd_and_the_floor_side_by_side(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, "-m", "busd.bench", "compare", "--systems", "busd-jsonl,floor-jsonl", "--agents", "8",
         "--duration", "1", "--reps", "1", "--workers", "2", "--out", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {r["target"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"busd", "floor"}
    busd, floor = runs["busd"], runs["floor"]
    assert busd["verification"]["ok"] and busd["verification"]["delivered"] == busd["acked"] > 0
    # the floor stores nothing, so there is nothing to verify; it must still have answered sends
    assert floor["verification"].get("skipped") and floor["acked"] > 0 and floor["errors"] == {}
    assert "| floor-jsonl |" in proc.stdout and "| busd-jsonl |" in proc.stdout
