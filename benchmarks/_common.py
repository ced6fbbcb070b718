"""Shared helpers for benchmarks: timing, peak memory of a child process, the prompt sets."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Callable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_rss_mib_of(code: str) -> float:
    """Peak resident memory (MiB) of a fresh Python process running ``code``."""
    p = subprocess.run([sys.executable, "-c", code + "\nimport resource,json;print(json.dumps(resource.getrusage("
                        "resource.RUSAGE_SELF).ru_maxrss))"], capture_output=True, text=True, check=True)
    return float(json.loads(p.stdout.strip().splitlines()[-1])) / 1024


def self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def contrast_pairs(n: int) -> tuple[list[str], list[str]]:
    """``n`` harmful and ``n`` harmless instructions from the shipped refusal data."""
    from steerscope.data import data_path, read_jsonl

    harm = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmful.jsonl"))][:n]
    safe = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmless.jsonl"))][:n]
    return harm, safe
