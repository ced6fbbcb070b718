"""Shared helpers for benchmarks: timing, peak memory of a child process, the prompt sets."""

from __future__ import annotations

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


def peak_rss_increase_mib(fn: Callable[[], object], interval: float = 0.002) -> float:
    """Peak resident memory above the level before the call (MiB), sampled every ``interval`` s."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return (max(peak[0], proc.memory_info().rss) - base) / 2**20


def contrast_pairs(n: int) -> tuple[list[str], list[str]]:
    """``n`` harmful and ``n`` harmless instructions from the shipped refusal data."""
    from steerscope.data import data_path, read_jsonl

    harm = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmful.jsonl"))][:n]
    safe = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmless.jsonl"))][:n]
    return harm, safe
