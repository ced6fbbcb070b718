"""The HF path with transformers' static KV cache, and with ``torch.compile`` on top (issue 27, item 3).

32 prompts x exactly 64 new tokens (``min_new_tokens``: equal work), greedy, SmolLM2-135M fp32 on CPU, a
norm-8 random vector at layer 12 (alpha 1, every position), as in ``bench_hf.py``. Each configuration is
first checked for parity against the default (dynamic) cache, unsteered and steered (rows whose token ids
are all equal), then timed over interleaved rounds in one process. ``--compile`` wraps the model's forward
in ``torch.compile`` *after* the references are taken, as a user would, and times only that configuration
(steerscope now refuses to attach hooks to a compiled model, since the hooks silently never ran: the
parity check is run through raw hooks on ``lm.model`` here for that reason).

Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_hf_cache.py --rounds 3 --json
    OMP_NUM_THREADS=2 python benchmarks/bench_hf_cache.py --rounds 2 --compile --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import steerscope as ss
from bench_vllm import PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="time the static cache under torch.compile only")
    ap.add_argument("--json", action="store_true", help="one JSON line")
    a = ap.parse_args()
    n = a.new_tokens
    lm = ss.load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(lm.d_model, generator=g)
    add = 8 * v / v.norm()
    batch = lm.tokenize([lm.format_chat(p) for p in PROMPTS], padding_side="left", templated=True)

    def gen(steer: bool, **kw: object) -> torch.Tensor:  # a raw pre-hook on block 12: what ss.steering adds
        h = lm.blocks[12].register_forward_pre_hook(lambda _m, args: (args[0] + add, *args[1:])) if steer else None
        try:
            with torch.no_grad():
                ids = lm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=lm.tokenizer.pad_token_id, **kw)
        finally:
            if h is not None:
                h.remove()
        return ids[:, batch["input_ids"].shape[1]:]

    with torch.no_grad(), ss.steering(lm, ss.SteeringVector({12: add}), 1.0):
        via_ss = lm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=lm.tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
    ref = {False: gen(False), True: gen(True)}
    assert torch.equal(via_ss, ref[True]), "the raw hook must add what ss.steering adds"
    configs: dict[str, dict] = {"dynamic": {}, "static": {"cache_implementation": "static"}}
    if a.compile:
        configs = {"static_compiled": {"cache_implementation": "static"}}
        lm.model.forward = torch.compile(lm.model.forward, dynamic=False)
    parity, times = {}, {k: {"unsteered": [], "steered": []} for k in configs}
    for name, kw in configs.items():  # first calls (compilation included) and parity
        for steer in (False, True):
            t = time.perf_counter()
            out = gen(steer, **kw)
            parity[f"{name}_{'steered' if steer else 'unsteered'}"] = {
                "rows_equal": int((out == ref[steer]).all(1).sum()), "rows": out.shape[0],
                "rows_equal_unsteered_ref": int((out == ref[False]).all(1).sum()),
                "first_call_s": round(time.perf_counter() - t, 2)}
    for _ in range(a.rounds):
        for name, kw in configs.items():
            for steer in (False, True):
                t = time.perf_counter()
                gen(steer, **kw)
                times[name]["steered" if steer else "unsteered"].append(time.perf_counter() - t)
    res = {"threads": torch.get_num_threads(), "rows": len(PROMPTS), "new_tokens": n, "rounds": a.rounds,
           "steered_rows_changed": int((ref[True] != ref[False]).any(1).sum()), "parity": parity,
           "median_s": {k: {s: round(statistics.median(x), 3) for s, x in d.items()} for k, d in times.items()},
           "all_s": times}
    print(json.dumps(res, indent=None if a.json else 1))


if __name__ == "__main__":
    main()
