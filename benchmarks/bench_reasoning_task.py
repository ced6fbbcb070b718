"""Base greedy accuracy of a model on the reasoning study's task families (issue 25, paper B).

For each difficulty: the study's test split (``split(0, n, difficulty, seed)`` -> the test problems),
greedy completions of the chat-formatted prompt with ``max_new_tokens``, graded by math-verify
(``metrics/math.is_correct``); accuracy with its 95 % Wilson interval. Writes one JSON per call.
``--samples K`` adds paper B's metric on the first ``--n-sampled`` problems: K samples at T = 1 per problem
(seeds as the study draws them, ``steps.sample_seed``), pass@1 = their mean, with a cluster-bootstrap interval
over problems (``stats.mean_ci``).

    python benchmarks/bench_reasoning_task.py --difficulties multi-2,multi-3 --n 200 --tokens 128
    python benchmarks/bench_reasoning_task.py --model qwen2.5-coder-0.5b --difficulties multi-2 --samples 8 --n-sampled 50
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import steerscope as ss
from steerscope._files import dumps
from steerscope.metrics.math import is_correct
from steerscope.stats import mean_ci, wilson
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.task import split


def sampled(lm: ss.LM, difficulty: str, n: int, tokens: int, k: int, seed: int = 0, system: str | None = None
            ) -> dict[str, Any]:
    """pass@1 over ``k`` samples at T = 1 on each of the first ``n`` test problems, with its cluster-bootstrap 95 %
    interval over problems; per-problem correct counts."""
    _, test = split(0, n, difficulty, seed)
    t0 = time.time()
    texts = [lm.format_chat(p.prompt, system) for p in test]
    rows = [(r, i) for r in range(k) for i in range(n)]
    comps = st.sample_rows(lm, [texts[i] for _, i in rows], None, tokens, [st.sample_seed(seed, i, r) for r, i in rows])
    ok = [[0] * k for _ in range(n)]
    for c, (r, i) in zip(comps, rows):
        ok[i][r] = int(is_correct(c, test[i].answer))
    point, lo, hi = mean_ci(ok)
    return {"difficulty": difficulty, "system": system, "n": n, "k": k, "max_new_tokens": tokens,
            "pass_at_1": point, "cluster_bootstrap95": [lo, hi], "seconds": round(time.time() - t0, 1),
            "per_problem_correct": [sum(r) for r in ok]}


def measure(lm: ss.LM, difficulty: str, n: int, tokens: int, seed: int = 0, system: str | None = None) -> dict[str, Any]:
    """Greedy accuracy on the first ``n`` test problems of ``difficulty`` (``system``: a system prompt), with examples."""
    _, test = split(0, n, difficulty, seed)
    t0 = time.time()
    texts = [lm.format_chat(p.prompt, system) for p in test]
    comps = st._generate(lm, texts, None, tokens, False, seed)
    ok = [int(is_correct(c, p.answer)) for c, p in zip(comps, test)]
    return {"difficulty": difficulty, "system": system, "n": n, "max_new_tokens": tokens, "correct": sum(ok),
            "acc": sum(ok) / n, "wilson95": wilson(sum(ok), n), "seconds": round(time.time() - t0, 1),
            "per_problem": ok, "examples": [f"{p.prompt} -> {c!r}" for p, c in zip(test[:8], comps[:8])]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--difficulties", default="multi-2")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--system", default=None, help="a system prompt (paper B: 'Please reason step by step, ...')")
    ap.add_argument("--samples", type=int, default=0, help="K samples at T = 1 per problem for pass@1 (default 0: "
                    "greedy only)")
    ap.add_argument("--n-sampled", type=int, default=50, help="problems for the sampled pass@1 (default 50)")
    ap.add_argument("--skip-greedy", action="store_true", help="only the sampled pass@1")
    a = ap.parse_args()
    lm = ss.load_model(a.model)
    rows = []
    for d in a.difficulties.split(","):
        if not a.skip_greedy:
            r = measure(lm, d, a.n, a.tokens, system=a.system)
            rows.append(r)
            print(f"{d}: {r['correct']}/{r['n']} = {r['acc']:.3f} [{r['wilson95'][0]:.3f}, {r['wilson95'][1]:.3f}] "
                  f"({r['seconds']} s)", flush=True)
        if a.samples:
            r = sampled(lm, d, a.n_sampled, a.tokens, a.samples, system=a.system)
            rows.append(r)
            lo, hi = r["cluster_bootstrap95"]
            print(f"{d}: pass@1 over {r['k']} samples x {r['n']} problems = {r['pass_at_1']:.3f} [{lo:.3f}, {hi:.3f}] "
                  f"({r['seconds']} s)", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(dumps({"model": a.model, "rows": rows}))


if __name__ == "__main__":
    main()
