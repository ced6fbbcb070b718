"""Frozen generation (QK / OV, one batched forward per step) versus plain steered generation.

Usage:
    python benchmarks/bench_frozen.py [--model smollm2-135m-safe] [--vector smollm2-135m-safe/refusal-dim]
        [--n 16] [--tokens 32] [--repeats 3]

Prints the time of plain steered generation, of QK- and OV-frozen generation (batched: base and
steered rows in one forward; ``frozen_path`` says whether the fast path ran, with the
layers below the steering layer computed once, or the doubled-batch ``generate`` fallback), and of
the naive two-pass reference (an unsteered pass, then a patched steered pass, per step, no cache;
timed on fewer tokens and scaled per token). Times are the best of ``--repeats`` rounds with the
three modes interleaved, as wall clock and as process CPU time (steadier on a shared machine when
run with one thread); ``new_tokens`` is how many tokens each mode generated.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import steerscope as ss
from steerscope.analyses import frozen as F
from steerscope.data import data_path, read_jsonl


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _interleaved(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Best wall and process-CPU seconds per name, the names run round-robin so that load from
    other jobs on a shared machine falls on all of them alike; also the new-token count of each."""
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    steps = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            steps[k] = int(fn().shape[1])
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu, steps


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-safe")
    ap.add_argument("--vector", default="smollm2-135m-safe/refusal-dim")
    ap.add_argument("--alpha", type=float, default=-1.0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-tokens", type=int, default=8)
    a = ap.parse_args()
    lm = ss.load_model(a.model)
    vec = ss.SteeringVector.load(a.vector)
    vec = vec.select([vec.layers[0]])
    prompts = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmful.jsonl"))][: a.n]

    def gen(mode: str, tokens: int = a.tokens):
        return lambda: F.frozen_generate_ids(lm, prompts, vec, a.alpha, mode=mode, max_new_tokens=tokens)
    torch.set_grad_enabled(False)
    gen("none", 2)()  # warm-up
    t, c, steps = _interleaved({m: gen(m) for m in ("none", "qk", "ov")}, a.repeats)
    t_ref = _time(lambda: F.reference_frozen_generate(lm, prompts, vec, a.alpha, "qk", max_new_tokens=a.ref_tokens), 1)
    t_none_short = _time(gen("none", a.ref_tokens), 1)
    res = {"model": a.model, "n_prompts": a.n, "tokens": a.tokens, "threads": torch.get_num_threads(),
           "steer_layer": vec.layers[0], "n_layers": lm.n_layers,
           "frozen_path": "fast" if not F._fast_missing(lm) else "doubled-generate",
           "t_plain_s": round(t["none"], 2), "t_qk_s": round(t["qk"], 2), "t_ov_s": round(t["ov"], 2),
           "ratio_qk": round(t["qk"] / t["none"], 2), "ratio_ov": round(t["ov"] / t["none"], 2),
           "cpu_plain_s": round(c["none"], 2), "cpu_ratio_qk": round(c["qk"] / c["none"], 2),
           "cpu_ratio_ov": round(c["ov"] / c["none"], 2), "new_tokens": steps,
           f"ratio_two_pass_reference_{a.ref_tokens}tok": round(t_ref / t_none_short, 2)}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
