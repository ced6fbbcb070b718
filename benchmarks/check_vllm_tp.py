"""Steered vLLM at tensor_parallel_size=2 on a real model against the HF path (issue 27, item 1).

Qwen2.5-Coder-0.5B-Instruct (14 heads, 2 KV heads: TP = 2 divides both) split over 2 CPU workers (the mp
executor, each rank bound to one CPU), greedy fp32, 8 prompts x 32 new tokens, the cases of
tests/test_vllm_parity.py: unsteered, a one-layer vector (random, norm 0.5 x the layer's residual norm at
layer 12), a three-layer one (layers 0, 12, 20), a mixed batch (each row its own vector / alpha / positions,
some unsteered) and directional ablation. Per case it prints equal tokens / total and, at the first
differing token of a row, HF's logit gap between its own token and vLLM's (relative to the top logit), so a
near-tie flipped by the all-reduce order can be told from a wrong result. It also checks that both ranks
steered and hold the same steered residual stream (the worker's per-rank stats).

Run (needs the engine environment, ``steerscope vllm-setup``, and 2 CPUs):
    OMP_NUM_THREADS=2 python benchmarks/check_vllm_tp.py --json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from typing import Any

import torch

import steerscope as ss
from steerscope.backends import vllm as bv
from steerscope.backends.verify import cut, eos_ids

PROMPTS = ["Write a Python function that reverses a string.", "What is the capital of France?",
           "Explain recursion in one sentence.", "Name three sorting algorithms.", "Hi",
           "How do I read a file line by line in Python?", "Describe the sea in one sentence.",
           "What does HTTP stand for?"]


def hf_ids(lm: ss.LM, texts: list[str], n: int, ctx: Any = None) -> list[list[int]]:
    """New token ids from HF generate (all texts in one left-padded batch), cut after the first EOS."""
    batch = lm.tokenize(texts, padding_side="left")
    with ctx or nullcontext(), torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    eos = eos_ids(lm)
    return [cut(row, eos) for row in out[:, batch["input_ids"].shape[1]:].tolist()]


def first_gap(lm: ss.LM, text: str, hf: list[int], vl: list[int], ctx: Any) -> dict[str, Any] | None:
    """Where a row first differs: HF's logits there for its own token and vLLM's, relative to the top logit."""
    k = next((i for i, (a, b) in enumerate(zip(hf, vl)) if a != b), None)
    if k is None:
        return None
    ids = lm.tokenize([text])["input_ids"]
    full = torch.cat([ids, torch.tensor([hf[:k]], dtype=ids.dtype)], 1)
    with ctx or nullcontext(), torch.no_grad():
        logits = lm.model(input_ids=full).logits[0, -1].float()
    top = float(logits.abs().max())
    return {"position": k, "hf_token": hf[k], "vllm_token": vl[k],
            "gap": float(logits[hf[k]] - logits[vl[k]]), "gap_rel": float(logits[hf[k]] - logits[vl[k]]) / top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="alias or folder (default: %(default)s)")
    ap.add_argument("--tp", type=int, default=2, help="tensor_parallel_size (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per row (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="one JSON line")
    a = ap.parse_args()
    n = a.new_tokens
    lm = ss.load_model(a.model)
    texts = [lm.format_chat(p) for p in PROMPTS]
    with torch.no_grad():
        hs = lm.model(**lm.tokenize(texts), output_hidden_states=True).hidden_states
    g = torch.Generator().manual_seed(0)

    def vec(layers: list[int], scale: float) -> ss.SteeringVector:
        out = {}
        for k in layers:
            r = torch.randn(lm.d_model, generator=g)
            out[k] = scale * float(hs[k][:, -1].norm(dim=-1).mean()) * r / r.norm()
        return ss.SteeringVector(out)

    one, three = vec([12], 0.5), vec([0, 12, 20], 0.25)
    t0 = time.time()
    eng = bv.engine_for(lm, tensor_parallel_size=a.tp)
    res: dict[str, Any] = {"model": a.model, "tensor_parallel_size": a.tp, "prompts": len(texts), "new_tokens": n,
                           "engine_start_s": time.time() - t0, "cases": {}}
    ids = bv.prompt_ids(lm, texts, True)
    params = bv.stop_params(lm, n, False, 1.0, None)
    base = hf_ids(lm, texts, n)
    mixed = [None, (one, 1.0, "all"), (three, 1.0, "all"), None, (one, -1.0, "all"), (one, 1.5, "prompt"),
             (three, 1.0, "generated"), None]
    cases: dict[str, tuple[list[Any], list[Any]]] = {
        "unsteered": ([None] * 8, [None] * 8),
        "one layer": ([bv.spec(eng, one, 1.0)] * 8, [ss.steering(lm, one, 1.0)] * 8),
        "three layers": ([bv.spec(eng, three, 1.0)] * 8, [ss.steering(lm, three, 1.0)] * 8),
        "mixed batch": ([None if c is None else bv.spec(eng, *c) for c in mixed],
                        [None if c is None else ss.steering(lm, *c) for c in mixed]),
        "ablation": ([bv.spec(eng, None, ablate=one)] * 8, [ss.ablation(lm, one)] * 8),
    }
    for name, (specs, ctxs) in cases.items():
        vl, _ = eng.generate_ids(ids, specs, params)
        hf = [hf_ids(lm, [t], n, c)[0] for t, c in zip(texts, ctxs)] if name == "mixed batch" else \
            hf_ids(lm, texts, n, ctxs[0])
        eq = sum(x == y for h, v in zip(hf, vl) for x, y in zip(h, v))
        total = sum(max(len(h), len(v)) for h, v in zip(hf, vl))
        gaps = [first_gap(lm, t, h, v, c) for t, h, v, c in zip(texts, hf, vl, ctxs) if h != v]
        res["cases"][name] = {"equal_tokens": eq, "total": total, "rows_identical": sum(h == v for h, v in zip(hf, vl)),
                              "rows_changed_vs_unsteered": sum(h != b for h, b in zip(hf, base)),
                              "first_differences": gaps}
    stats = eng.stats()
    ranks = stats.get("ranks", [])
    res["ranks_steered"] = [r.get("steered_layer_calls", 0) > 0 for r in ranks]
    res["ranks_same_stream"] = len({r.get("last_steered_stream_sum") for r in ranks}) == 1 if ranks else None
    res["wall_s"] = time.time() - t0
    bv.close_engines()
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
