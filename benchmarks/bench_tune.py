"""Does ``tune``'s search find what the exhaustive grid finds, with a quarter of the work? (issue 23)

For each case (model, behaviour), ``tune`` runs twice with the same seed, hence the same split and
the same extracted vector: once ``exhaustive=True`` (every point of layers x positions x doses) and
once with the default search (Optuna TPE, ``budget_evals`` = a quarter of the grid). Printed per case:

- ratio: the search's best validation objective / the exhaustive grid's best;
- evals: configurations the search scored / the grid's size (pruned ones count);
- in CI: whether the search's test effect lies in the 95 % interval of the exhaustive optimum's test effect;
- the wall seconds of each run (the search run is a whole ``tune``).

Targets (issue 23): ratio >= 0.95 with evals <= 0.25, and in CI, on formality (the embedded model)
and refusal (the organism) on two families; the whole search run <= 10 min on 2 idle cores.

    python benchmarks/bench_tune.py --cases smollm2-135m:formality,smollm2-135m-safe:refusal,gemma3-270m:formality
    python benchmarks/bench_tune.py --tiny      # a tiny random model, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import steerscope as ss
from steerscope._files import dumps
from steerscope.data import data_path, read_jsonl
from steerscope.tune import Settings, TuneResult, tune

CASES = "smollm2-135m:formality,smollm2-135m-safe:refusal,gemma3-270m:formality,qwen2.5-coder-0.5b:refusal"
TRAITS = ("formality", "sentiment", "politeness")


def contrast(behaviour: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` positive and negative examples: a shipped trait's pairs, or harmful vs harmless instructions."""
    if behaviour in TRAITS:
        rows = read_jsonl(data_path("traits", f"{behaviour}.jsonl"))[:n]
        return [r["positive"] for r in rows], [r["negative"] for r in rows]
    if behaviour == "refusal":
        harm = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmful.jsonl"))][:n]
        safe = [r["instruction"] for r in read_jsonl(data_path("refusal", "harmless.jsonl"))][:n]
        return harm, safe
    raise SystemExit(f"unknown behaviour {behaviour!r}; choose one of {', '.join((*TRAITS, 'refusal'))}")


def tiny_model() -> ss.LM:
    """A 4-layer random Llama (d_model 64) with the embedded model's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return ss.from_hf(model.eval(), ss.load_model("smollm2-135m").tokenizer, name="tiny-llama")


def run_case(lm: ss.LM, behaviour: str, n: int, seed: int, settings: Settings, layers: list[int] | None,
             scorer: str | None) -> dict[str, Any]:
    """One case: the exhaustive run, the search run, and their comparison."""
    pos, neg = contrast(behaviour, n)
    kw: dict[str, Any] = dict(layers=layers, seed=seed, settings=settings, scorer=scorer)
    t0 = time.perf_counter()
    grid: TuneResult = tune(lm, pos, neg, exhaustive=True, **kw)
    t1 = time.perf_counter()
    found: TuneResult = tune(lm, pos, neg, **kw)
    t2 = time.perf_counter()
    lo, hi = grid.test.effect.ci95
    best = grid.search.best.objective
    return {"model": lm.name, "behaviour": behaviour, "scorer": found.scorer, "pairs": len(pos),
            "ratio": found.search.best.objective / best if best > 0 else float("nan"),
            "evals": found.search.evaluations / grid.search.grid_size, "evaluations": found.search.evaluations,
            "grid_size": grid.search.grid_size, "search_test_effect": found.test.effect.value,
            "grid_test_effect": grid.test.effect.value, "grid_test_ci95": [lo, hi],
            "in_ci": bool(lo <= found.test.effect.value <= hi), "search_seconds": t2 - t1, "grid_seconds": t1 - t0,
            "search": found.summary()["recommended"], "grid": grid.summary()["recommended"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=CASES, help=f"model:behaviour,... (default: {CASES})")
    p.add_argument("--pairs", type=int, default=60, help="contrast pairs per case (default: 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default=None, help="a scorer name for every case (default: teacher-forced log-odds)")
    p.add_argument("--tiny", action="store_true", help="one case on a tiny random model with small settings (seconds)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    os.environ.setdefault("STEERSCOPE_NO_PROGRESS", "1")
    if a.tiny:
        st, layers = Settings(n_alphas=4, n_neutral=8, kl_tokens=4, n_boot=200, rungs=2), [1, 2, 3]
        models = [("tiny", "formality")]
        a.pairs = min(a.pairs, 12)
    else:
        st, layers = Settings(), None
        models = [tuple(c.split(":", 1)) for c in a.cases.split(",") if c]
    rows = []
    for model, behaviour in models:
        lm = tiny_model() if model == "tiny" else ss.load_model(model)
        rows.append(run_case(lm, behaviour, a.pairs, a.seed, st, layers, a.scorer))
        if not a.json:
            r = rows[-1]
            print(f"{r['model']:>20} {r['behaviour']:>10}  ratio {r['ratio']:.3f}  evals {r['evaluations']}/"
                  f"{r['grid_size']} = {r['evals']:.2f}  in CI {r['in_ci']}  search {r['search_seconds']:.0f} s  "
                  f"grid {r['grid_seconds']:.0f} s", flush=True)
    if a.json:
        print(dumps({"cases": rows}, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
