"""Overhead of per-request conditions on the eager vLLM engine (issue 24, section 3). Figures: README and docs/conditional.md.

Four configurations on one engine, 32 prompts x 64 new tokens (EOS ignored, so each generates 2048 tokens),
SmolLM2-135M fp32, a norm-8 vector at layer 12 (alpha 1), interleaved ``--repeats`` times:

1. ``unsteered``: no spec;
2. ``plain``: every request steered, no gate;
3. ``gated``: every request steered under a prompt condition at layer 6 (about half open);
4. ``gated-token``: the same under an ``on="token"`` condition (re-decided per token).

Reported per round: seconds of each, and the ratios gated / plain and gated-token / plain (the issue's target:
<= 1.10 at batch 32); the median over rounds with the load average before each timing. The "no request gated"
cost is ``plain`` itself: a step without gated requests takes the plain path plus one ``spec.gated`` check per
request, so it is measured by comparing ``plain`` here against the base branch's ``bench_vllm.py``.

Run (on an idle machine):
    STEERSCOPE_VLLM_ENV=... python benchmarks/bench_vllm_gates.py --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

import steerscope as ss
from steerscope.backends import vllm as bv

PROMPTS = ["Tell me about your weekend.", "What is the capital of France?", "Write a haiku about rain.",
           "How do I bake bread?", "Explain photosynthesis to a child.", "Give me three tips for sleeping well.",
           "What is 17 times 23?", "Describe the sea in one sentence."] * 4


CONFIGS = ("unsteered", "plain", "gated", "gated-token")


def configs(lm: ss.LM, eng: bv.Engine, names: tuple[str, ...] = CONFIGS) -> dict[str, list[Any]]:
    """One spec list per configuration (32 requests each); only ``names`` are built (``unsteered,plain`` needs no
    condition support, so the same script times a checkout from before the gates)."""
    g = torch.Generator().manual_seed(0)
    vec = ss.SteeringVector({12: 8 * torch.nn.functional.normalize(torch.randn(lm.d_model, generator=g), dim=0)})
    d = torch.randn(lm.d_model, generator=g)
    n = len(PROMPTS)
    make = {"unsteered": lambda: [None] * n, "plain": lambda: [bv.spec(eng, vec, 1.0)] * n,
            "gated": lambda: [bv.spec(eng, vec, 1.0, condition=ss.Condition(d, layer=6, threshold=0.0))] * n,
            "gated-token": lambda: [bv.spec(eng, vec, 1.0,
                                            condition=ss.Condition(d, layer=6, threshold=0.0, on="token"))] * n}
    return {k: make[k]() for k in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)} "
                    "(default: all)")
    args = ap.parse_args()
    lm = ss.load_model("smollm2-135m")
    eng = bv.engine_for(lm)
    ids = bv.prompt_ids(lm, [lm.format_chat(p) for p in PROMPTS], True)
    params = dict(bv.stop_params(lm, args.tokens, False, 1.0, None), stop_token_ids=[], ignore_eos=True)
    cases = configs(lm, eng, tuple(args.configs.split(",")))
    eng.generate_ids(ids, next(iter(cases.values())), params)  # warm-up
    rounds = []
    for _ in range(args.repeats):
        row: dict[str, Any] = {"load": os.getloadavg()[0]}
        for name, specs in cases.items():
            t0 = time.perf_counter()
            eng.generate_ids(ids, specs, params)
            row[name] = time.perf_counter() - t0
        for k in ("gated", "gated-token"):
            if k in row and "plain" in row:
                row[f"{k}/plain"] = row[k] / row["plain"]
        rounds.append(row)
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    spread = {k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in rounds[0]}
    out = {"rounds": rounds, "median": summary, "range": spread, "n_rounds": len(rounds), "batch": len(PROMPTS),
           "new_tokens": args.tokens}
    print(json.dumps(out, indent=1) if args.json else summary)
    bv.close_engines()


if __name__ == "__main__":
    main()
