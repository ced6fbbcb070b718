"""Steered vs unsteered greedy generation on the embedded model, same prompts, one run.

    python benchmarks/bench_steering.py [--prompts 16] [--tokens 64] [--repeats 3]

Prints the best-of-N wall time of each and the overhead ratio (target <= 1.03), interleaving
the two so drift in machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import steerscope as ss
from _common import contrast_pairs, peak_rss_increase_mib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=12)
    a = ap.parse_args()
    lm = ss.load_model("smollm2-135m")
    harm, safe = contrast_pairs(a.prompts)
    vec = ss.extract(lm, harm, safe, layers=[a.layer])
    prompts = safe[: a.prompts]
    batch = lm.tokenize([lm.format_chat(p) for p in prompts])
    # min_new_tokens = max_new_tokens: both runs decode exactly the same number of steps
    kw = dict(max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)

    def plain() -> None:
        with torch.no_grad():
            lm.model.generate(**batch, **kw)

    def steered() -> None:
        with ss.steering(lm, vec, alpha=1.0), torch.no_grad():
            lm.model.generate(**batch, **kw)

    plain()  # warm-up
    t_plain, t_steer = [], []
    for _ in range(a.repeats):
        for fn, acc in ((plain, t_plain), (steered, t_steer)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    mem = {"unsteered": peak_rss_increase_mib(plain), "steered": peak_rss_increase_mib(steered)}
    res = {"peak_rss_increase_mib": mem, "prompts": a.prompts, "new_tokens": a.tokens, "unsteered_s": min(t_plain), "steered_s": min(t_steer),
           "ratio": min(t_steer) / min(t_plain), "threads": torch.get_num_threads()}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
