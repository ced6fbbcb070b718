"""Crash test (issue 15): a study killed with SIGKILL at random points, then resumed, gives records
equal to an uninterrupted run (the identifiability study at tiny settings on a tiny model)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import steerscope as ss

SRC = str(Path(ss.__file__).resolve().parents[1])
ARGS = ["--traits", "formality", "--alphas", "2", "--seeds", "0", "--n-prompts", "2", "--max-new-tokens", "4",
        "--ks", "1", "--n-k-prompts", "1", "--n-shift-prompts", "3", "--n-cov-prompts", "4", "--n-jac-prompts", "1"]


def _start(model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "STEERSCOPE_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "steerscope.cli", "study", "identifiability", "--model", str(model),
                             "--out", str(out), "--json", *ARGS], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _records(out: Path) -> dict[str, dict]:
    recs = {}
    for p in sorted((out / "steps").glob("*.json")):
        r = json.loads(p.read_text())
        recs[p.name] = {k: v for k, v in r.items() if k not in ("_seconds", "_cpu_seconds", "_checksum")}
    return recs


def _wait_first_record(p: subprocess.Popen, out: Path) -> float:
    """Block until the run has written its first step record (the kill then lands between steps or
    inside one, never in the start-up); returns that moment."""
    while p.poll() is None and not list((out / "steps").glob("*.json")):
        time.sleep(0.05)
    return time.monotonic()


def test_sigkill_at_random_points_then_resume_gives_identical_records(tiny_folder, tmp_path):
    ref = _start(tiny_folder, tmp_path / "ref")
    first = _wait_first_record(ref, tmp_path / "ref")
    assert ref.wait(timeout=900) == 0, ref.stderr.read()[-2000:]
    steps_wall = time.monotonic() - first  # from the first record to the end: where the kills land
    expected = _records(tmp_path / "ref")
    assert len(expected) >= 8
    killed_mid_run = 0
    for seed in (0, 1):
        out = tmp_path / f"run{seed}"
        p = _start(tiny_folder, out)
        _wait_first_record(p, out)
        time.sleep(random.Random(seed).uniform(0.0, 0.8) * steps_wall)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed_mid_run += 1
        p.wait()
        resumed = _start(tiny_folder, out)
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
        assert _records(out) == expected, seed
        assert not list(out.rglob("*.tmp"))
    assert killed_mid_run >= 1
