"""One RLOO step of the reasoning study, split into its parts: sampling and the gradient pass.

Each part is timed both ways. Sampling: every row prefilled (the trainer before 3b293df) and each prompt
prefilled once, its KV cache repeated for its k rows (today's); the tokens must agree. Gradient pass, on the
same samples, policy and advantages: every row laid out in full (``group=1``, before 0ee0344) and each prompt
run once with its cache shared by its k rows (``group=k``, today's). Rounds alternate the order; the relative
gradient difference of the two is printed beside the times. Defaults are the ``cpu-multi`` preset's step (SmolLM2, multi-2-tiny with
6 worked examples, 4 prompts x 8 samples, 64 tokens, a bias at layer 0).

    OMP_NUM_THREADS=2 python benchmarks/bench_rloo_step.py --rounds 3 --out benchmarks/results/rloo_step.json
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import steerscope as ss
from steerscope._files import atomic_write, dumps
from steerscope.analyses.trainable import SteeringBias
from steerscope.extract.rl import rloo_advantages, sample, surrogate_backward
from steerscope.metrics.math import math_reward
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import preset


def grad_pass(lm: ss.LM, bias: SteeringBias, batch: tuple[torch.Tensor, ...], adv: torch.Tensor, group: int,
              micro_batch: int) -> tuple[float, torch.Tensor]:
    """Seconds of one surrogate_backward and the gradient it left."""
    for p in bias.parameters():
        p.grad = None
    t0 = time.perf_counter()
    surrogate_backward(lm, bias, *batch, adv, micro_batch=micro_batch, group=group)
    return time.perf_counter() - t0, torch.cat([p.grad.flatten() for p in bias.parameters()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-multi", help="reasoning preset whose step is timed (default: %(default)s)")
    ap.add_argument("--layer", type=int, default=0, help="layer of the bias (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (default: %(default)s)")
    ap.add_argument("--micro-batch", type=int, default=8,
                    help="rows per gradient pass, both ways (default: %(default)s; the trainer's 16 rows of "
                         "700-token prompts need over 20 GiB laid out in full)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    a = ap.parse_args()
    cfg = preset(a.preset)
    lm = ss.load_model(cfg.model)
    train, _ = st.problems(cfg)
    probs = train[:cfg.prompts_per_step]
    texts = st.chat_texts(lm, cfg, probs)
    bias = SteeringBias(lm, [a.layer])
    with torch.no_grad():
        for p in bias.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    rows: dict[str, list[float]] = {"sample_rows": [], "sample_shared": [], "grad_rows": [], "grad_shared": []}
    err, same_tokens = [], []
    rl = importlib.import_module("steerscope.extract.rl")  # (steerscope.extract's name `rl` is not the module)
    shared_prefill = rl._prefilled
    for r in range(a.rounds):
        drawn = {}
        for way in (("rows", "shared") if r % 2 == 0 else ("shared", "rows")):
            rl._prefilled = shared_prefill if way == "shared" else (lambda *x: {})  # type: ignore[assignment]
            t0 = time.perf_counter()
            drawn[way] = sample(lm, bias, texts, cfg.k, cfg.max_new_tokens, cfg.temperature, seed=r)
            rows[f"sample_{way}"].append(time.perf_counter() - t0)
        rl._prefilled = shared_prefill
        same_tokens.append(bool(torch.equal(drawn["rows"][2], drawn["shared"][2])))
        *batch, comps = drawn["shared"]
        rew = torch.tensor([math_reward(probs[i // cfg.k].prompt, c, probs[i // cfg.k].answer)
                            for i, c in enumerate(comps)], dtype=torch.float32)
        adv = rloo_advantages(rew.view(-1, cfg.k)).flatten()
        if not bool((adv != 0).any()):
            adv = torch.linspace(-1, 1, len(comps))  # every row counts (a step whose rewards all tie skips them)
        order = (1, cfg.k) if r % 2 == 0 else (cfg.k, 1)
        got = {g: grad_pass(lm, bias, tuple(batch), adv, g, a.micro_batch) for g in order}
        rows["grad_rows"].append(got[1][0])
        rows["grad_shared"].append(got[cfg.k][0])
        err.append(float((got[cfg.k][1] - got[1][1]).norm() / got[1][1].norm().clamp_min(1e-30)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    out: dict[str, Any] = {
        "preset": a.preset, "model": cfg.model, "prompts": len(texts), "k": cfg.k, "max_new_tokens": cfg.max_new_tokens,
        "prompt_tokens": [len(lm.tokenizer(t)["input_ids"]) for t in texts], "threads": torch.get_num_threads(),
        "rounds": a.rounds, "micro_batch": a.micro_batch, "seconds": rows, "median": med,
        "grad_rows_over_shared": med["grad_rows"] / med["grad_shared"],
        "sample_rows_over_shared": med["sample_rows"] / med["sample_shared"],
        "step_before_over_after": (med["sample_rows"] + med["grad_rows"]) / (med["sample_shared"] + med["grad_shared"]),
        "grad_relative_difference": err, "same_tokens": same_tokens}
    print(dumps(out))
    if a.out:
        atomic_write(Path(a.out), dumps(out).encode())


if __name__ == "__main__":
    main()
