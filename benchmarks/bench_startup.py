"""Start-up time of the command line: ``steerscope --help``, ``vectors`` and ``inspect <shipped vector>``.

    python benchmarks/bench_startup.py [--runs 5] [--json]

Each command runs ``--runs`` times as a fresh ``python -m steerscope.cli`` subprocess (the checkout's
``src`` first on PYTHONPATH); prints the median wall time per command and whether it stayed under
the 2 s target of issue 26. Nothing here needs torch until ``inspect`` of a ``.gguf`` vector.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
COMMANDS = {"--help": ["--help"], "vectors": ["vectors"], "inspect": ["inspect", "smollm2-135m-safe/refusal-dim"]}
TARGET_S = 2.0


def wall_times(args: list[str], runs: int) -> list[float]:
    """Wall seconds of ``runs`` fresh ``python -m steerscope.cli ARGS`` processes (each must exit 0)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "steerscope.cli", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    medians = {name: statistics.median(wall_times(args, a.runs)) for name, args in COMMANDS.items()}
    if a.json:
        print(json.dumps({"median_s": medians, "runs": a.runs, "target_s": TARGET_S,
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}))
        return
    for name, s in medians.items():
        print(f"steerscope {name:8s} median {s:.2f} s over {a.runs} runs ({'ok' if s < TARGET_S else 'OVER'} "
              f"the {TARGET_S:.0f} s target)")


if __name__ == "__main__":
    main()
