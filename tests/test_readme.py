"""The README's two set-up commands are the ones CI runs, verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_install_and_test_commands_in_order():
    install, test = _readme_commands()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert install in ci and test in ci
    assert ci.index(install) < ci.index(test)
    assert "torch==2.13.0" in install and "steerscope demo" in install
    assert test.startswith("python -m pytest")


def test_under_pytest_n_each_worker_has_its_own_cpus_and_every_cpu_widens_and_restores():
    """The README's ``pytest -n 2``: each worker (and what it starts) runs on its own CPU share with one torch
    thread and a vLLM binding to that share; ``every_cpu`` (TP = 2 tests) gives every CPU back for its block only.
    Outside xdist nothing is pinned."""
    import os

    import torch

    from conftest import ALL_CPUS, PIN, every_cpu

    if not PIN:
        pytest.skip("CPU affinity is Linux-only; workers are not pinned here")
    mine, bind = os.sched_getaffinity(0), os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and 1 < n <= len(ALL_CPUS):
        assert len(mine) == len(ALL_CPUS) // n and torch.get_num_threads() == 1
        assert bind == ",".join(map(str, sorted(mine)))
    else:
        assert sorted(mine) == ALL_CPUS
    with every_cpu():
        assert sorted(os.sched_getaffinity(0)) == ALL_CPUS
        if os.environ.get("PYTEST_XDIST_WORKER"):
            assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ  # a TP = 2 engine computes its own per-rank binding
    assert os.sched_getaffinity(0) == mine and os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == bind
