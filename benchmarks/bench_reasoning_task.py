"""Base greedy accuracy of a model on the reasoning study's task families (issue 25, paper B).

For each difficulty: the study's test split (``split(0, n, difficulty, seed)`` -> the test problems),
greedy completions of the chat-formatted prompt with ``max_new_tokens``, graded by math-verify
(``metrics/math.is_correct``); accuracy with its 95 % Wilson interval. Writes one JSON per call.
``--samples K`` adds paper B's metric on the first ``--n-sampled`` problems: K samples at T = 1 per problem
through the study's own evaluation (``steps.evaluate``: its seeds, pass@1 = their mean, a cluster-bootstrap
interval over problems; it also reports greedy accuracy on those problems).

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
from steerscope.stats import wilson
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import Config
from steerscope.studies.reasoning.task import split


def sampled(lm: ss.LM, difficulty: str, n: int, tokens: int, k: int, seed: int = 0, system: str | None = None,
            shots: int = 0, backend: str = "hf") -> dict[str, Any]:
    """The study's own evaluation (``steps.evaluate``) of the first ``n`` test problems: pass@1 over ``k`` samples
    at T = 1 per problem with its cluster-bootstrap 95 % interval over problems (and greedy accuracy on them)."""
    _, test = split(0, n, difficulty, seed)
    t0 = time.time()
    cfg = Config(difficulty=difficulty, n_test=n, max_new_tokens=tokens, system=system, seed=seed, eval_samples=k,
                 shots=shots, backend=backend)
    rec = st.evaluate(lm, test, cfg, difficulty)
    return {"difficulty": difficulty, "system": system, "shots": shots, "backend": backend, "max_new_tokens": tokens,
            **rec.to_dict(),
            "seconds": round(time.time() - t0, 1)}


def measure(lm: ss.LM, difficulty: str, n: int, tokens: int, seed: int = 0, system: str | None = None,
            shots: int = 0) -> dict[str, Any]:
    """Greedy accuracy on the first ``n`` test problems of ``difficulty`` (``system``: a system prompt; ``shots``:
    worked examples before each, as the study shows them), with examples."""
    _, test = split(0, n, difficulty, seed)
    t0 = time.time()
    texts = st.chat_texts(lm, Config(difficulty=difficulty, n_test=n, system=system, seed=seed, shots=shots), test)
    comps = st._generate(lm, texts, None, tokens, False, seed)
    ok = [int(is_correct(c, p.answer)) for c, p in zip(comps, test)]
    return {"difficulty": difficulty, "system": system, "shots": shots, "n": n, "max_new_tokens": tokens, "correct": sum(ok),
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
    ap.add_argument("--shots", type=int, default=0, help="worked examples before each problem (default 0)")
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="engine of the sampled pass@1 (default hf)")
    a = ap.parse_args()
    lm = ss.load_model(a.model)
    rows = []
    for d in a.difficulties.split(","):
        if not a.skip_greedy:
            r = measure(lm, d, a.n, a.tokens, system=a.system, shots=a.shots)
            rows.append(r)
            print(f"{d}: {r['correct']}/{r['n']} = {r['acc']:.3f} [{r['wilson95'][0]:.3f}, {r['wilson95'][1]:.3f}] "
                  f"({r['seconds']} s)", flush=True)
        if a.samples:
            r = sampled(lm, d, a.n_sampled, a.tokens, a.samples, system=a.system, shots=a.shots, backend=a.backend)
            rows.append(r)
            lo, hi = r["sampled_ci"]
            print(f"{d}: pass@1 over {r['k']} samples x {r['n']} problems = {r['sampled_acc']:.3f} [{lo:.3f}, {hi:.3f}] "
                  f"({r['seconds']} s)", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(dumps({"model": a.model, "rows": rows}))


if __name__ == "__main__":
    main()
