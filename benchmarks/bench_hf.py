"""The HF path's generation throughput against nnsight's, from one run (issue 27, item 3).

32 prompts x up to 64 new tokens, greedy, SmolLM2-135M fp32 on CPU, a norm-8 random vector at layer 12
(alpha 1, every position). Per round, in this order: ``ss.generate`` unsteered and steered (default
batching: one ``generate`` call for the 32 rows), the same with ``batch_size=16`` (the default before
the token budget), HF ``generate`` with exactly 64 new tokens per row unsteered and inside
``ss.steering`` (equal work, for the steering overhead: steering changes the texts and so where
they stop), then nnsight 0.8.1's ``LanguageModel.generate`` unsteered and steered in its own
venv (``--nnsight-python``; its model load is not timed). Both stop at EOS the same way (no
``min_new_tokens``), and the script checks that every configuration produced the same texts as its
nnsight counterpart, so the work is equal. Ratios are computed within a round; the median and the
range over rounds are printed, with the load average before each round.

Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_hf.py --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import steerscope as ss
from bench_vllm import NNSIGHT, PROMPTS, peer
from steerscope.backends import vllm as bv


def timed(fn) -> tuple[float, list[str]]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens at most (default: %(default)s)")
    ap.add_argument("--nnsight-python", default="/tmp/venv-nnsight/bin/python",
                    help="a Python with nnsight 0.8.1 (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="one JSON line")
    a = ap.parse_args()
    n = a.new_tokens
    lm = ss.load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    vec = ss.SteeringVector({12: 8 * (v := torch.randn(lm.d_model, generator=g)) / v.norm()})
    job = {"folder": str(bv.export_folder(lm)), "texts": [lm.format_chat(p) for p in PROMPTS], "n": n, "layer": 12,
           "vec": vec[12].tolist(), "threads": torch.get_num_threads()}
    configs = {
        "unsteered": lambda: ss.generate(lm, PROMPTS, max_new_tokens=n),
        "steered": lambda: ss.generate(lm, PROMPTS, vector=vec, max_new_tokens=n),
        "unsteered_bs16": lambda: ss.generate(lm, PROMPTS, max_new_tokens=n, batch_size=16),
        "steered_bs16": lambda: ss.generate(lm, PROMPTS, vector=vec, max_new_tokens=n, batch_size=16),
    }
    batch = lm.tokenize(job["texts"])

    def fixed(v: ss.SteeringVector | None) -> list[str]:  # exactly n tokens per row: equal work steered or not
        with ss.steering(lm, v, 1.0) if v is not None else torch.no_grad(), torch.no_grad():
            ids = lm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        return lm.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:])

    configs["unsteered_fixed"], configs["steered_fixed"] = lambda: fixed(None), lambda: fixed(vec)
    configs["unsteered"]()  # warm-up
    rounds = []
    for _ in range(a.rounds):
        r: dict = {"load": os.getloadavg()[0]}
        texts = {}
        for name, fn in configs.items():
            r[name], texts[name] = timed(fn)
        nn = peer(a.nnsight_python, NNSIGHT, job)
        if not isinstance(nn, dict):
            raise SystemExit(f"nnsight peer: {nn}")
        r["nnsight_unsteered"], r["nnsight_steered"] = nn["unsteered"], nn["steered"]
        r["same_texts"] = {name: sum(x == y for x, y in zip(texts[name], nn["texts_" + name.removesuffix("_bs16")]))
                           for name in configs if not name.endswith("_fixed")}
        r["rows_changed_by_steering"] = sum(x != y for x, y in zip(texts["unsteered"], texts["steered"]))
        rounds.append(r)

    def ratio(num: str, den: str) -> dict:
        xs = [r[num] / r[den] for r in rounds]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    res = {"prompts": len(PROMPTS), "new_tokens": n, "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rounds": rounds,
           # throughput ratios: nnsight time / ours (> 1: ours is faster)
           "ours_vs_nnsight_unsteered": ratio("nnsight_unsteered", "unsteered"),
           "ours_vs_nnsight_steered": ratio("nnsight_steered", "steered"),
           "bs16_vs_nnsight_unsteered": ratio("nnsight_unsteered", "unsteered_bs16"),
           "steered_over_unsteered": ratio("steered", "unsteered"),  # texts differ: not equal work
           "steered_over_unsteered_fixed": ratio("steered_fixed", "unsteered_fixed"),  # n tokens each: equal work
           "nnsight_steered_over_unsteered": ratio("nnsight_steered", "nnsight_unsteered")}
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
