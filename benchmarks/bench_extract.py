"""DIM extraction from 128 contrast pairs: steerscope vs steering-vectors, same model and layer.

    python benchmarks/bench_extract.py [--pairs 128] [--layer 12] [--repeats 2]

Both read the residual stream at the same place (steering-vectors' output of block l-1 is our
resid_pre of block l) at the last token, from chat-formatted prompts. Prints times, the speed-up,
the cosine of the two vectors, and each one's peak resident memory above the loaded model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import steerscope as ss
from _common import best_of, contrast_pairs, peak_rss_increase_mib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    import steering_vectors as sv

    lm = ss.load_model("smollm2-135m")
    harm, safe = contrast_pairs(a.pairs)
    pairs = [(lm.format_chat(h), lm.format_chat(s)) for h, s in zip(harm, safe)]
    ours_fn = lambda: ss.extract(lm, harm, safe, layers=[a.layer], batch_size=a.batch_size)
    theirs_fn = lambda: sv.train_steering_vector(
        lm.model, lm.tokenizer, pairs, layers=[a.layer - 1], read_token_index=-1, batch_size=a.batch_size)
    ours_v, theirs_v = ours_fn(), theirs_fn()  # warm-up and agreement
    cos = float(torch.nn.functional.cosine_similarity(ours_v[a.layer], theirs_v.layer_activations[a.layer - 1].float(), dim=0))
    t_ours = best_of(ours_fn, a.repeats)
    t_theirs = best_of(theirs_fn, a.repeats)
    mem_ours = peak_rss_increase_mib(ours_fn)
    mem_theirs = peak_rss_increase_mib(theirs_fn)
    print(json.dumps({"pairs": a.pairs, "layer": a.layer, "batch_size": a.batch_size, "steerscope_s": t_ours,
                      "steering_vectors_s": t_theirs, "speedup": t_theirs / t_ours, "cosine": cos,
                      "peak_rss_increase_mib": {"steerscope": mem_ours, "steering_vectors": mem_theirs}}))


if __name__ == "__main__":
    main()
