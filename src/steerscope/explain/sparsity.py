"""Card section ``sparsity``: how few dimensions of s carry the effect (paper A, §6).

Dimensions are ranked by |IE_vec| = |s ⊙ r| (r: alpha times the mean gradient, from the
attribution section); the bottom k are zeroed (:mod:`steerscope.sparsify`) and the sparsified
vector's teacher-forced effect retained is measured on the card's batch. The grid is refined by
bisection on k to the largest k that keeps ``sparsity_target`` (90 %) of the effect, giving the
fraction of dimensions needed. The |s| and random rules with the same k are the baselines.
:func:`scored_curve` (scorer on greedy generations) is shared with the refusal-mechanisms study.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from steerscope import sparsify as S
from steerscope.explain.behaviour import Behaviour, metric_of
from steerscope.explain.context import Context, ScoreFn
from steerscope.generation import generate
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.vector import SteeringVector

BASELINES = ("norm", "random")


def retained_at(ctx: Context, beh: Behaviour, r: torch.Tensor, method: str, k: int) -> float:
    """Effect retained with the bottom-k dimensions of ``method`` zeroed."""
    s = ctx.vector[ctx.layer].float()
    keep = S.keep_mask(method, k / s.numel(), s, r, seed=ctx.settings.seed)
    sv = S.apply(ctx.vector, keep)
    return beh.retained(metric_of(ctx.lm, beh.pb, sv, ctx.alpha, batch_size=ctx.settings.batch_size))


def needed(ctx: Context, beh: Behaviour, r: torch.Tensor, ks: Sequence[int], vals: Sequence[float]) -> int:
    """The largest k (dimensions zeroed) whose |IE| effect retained >= the target: grid, then bisection."""
    st = ctx.settings
    ok = [k for k, v in zip(ks, vals) if v >= st.sparsity_target]
    lo = max(ok) if ok else 0  # known good (k = 0 is the dense vector)
    higher = [k for k in ks if k > lo]
    hi = min(higher) if higher else lo
    for _ in range(st.bisect_sparsity if hi > lo else 0):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if retained_at(ctx, beh, r, "ie", mid) >= st.sparsity_target else (lo, mid)
    return lo


def section(ctx: Context, beh: Behaviour) -> dict[str, Any]:
    """The ``sparsity`` record: ``fraction_needed`` for 90 % of the effect, and the curves."""
    st, d = ctx.settings, ctx.lm.d_model
    r = ctx.load("attribution")["mean_grad"].float()
    ks = [S.n_drop(d, sp) for sp in st.sparsities]
    curves: dict[str, list[float]] = {}
    for method in progress(("ie", *BASELINES), desc="sparsity", enabled=ctx.show_progress):
        curves[method] = [retained_at(ctx, beh, r, method, k) for k in ks]
    k = needed(ctx, beh, r, ks, curves["ie"])
    s = ctx.vector[ctx.layer].float()
    top = (s * r).abs().argsort(descending=True)[:10].tolist()
    out: dict[str, Any] = {"fraction_needed": (d - k) / d, "dims_needed": d - k, "target": st.sparsity_target,
                           "rule": "ie", "sparsities": list(st.sparsities), "kept_fraction": [(d - x) / d for x in ks],
                           "effect_retained": curves, "top_dims": top}
    if ctx.scorer is not None:
        out["scorer"] = scored_curve(ctx.lm, ctx.prompts, ctx.vector, ctx.alpha, r, ("ie",), st.sparsities,
                                     ctx.scorer, st.gen_tokens, 16, st.seed, ctx.show_progress)
    return out


def scored_curve(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, r: torch.Tensor,
                 methods: Sequence[str], sparsities: Sequence[float], scorer: ScoreFn, max_new_tokens: int,
                 batch_size: int = 16, seed: int = 0, show_progress: bool = False) -> dict[str, list[float]]:
    """{method: scorer mean of greedy generations with the vector sparsified at each sparsity}."""
    s = vector[vector.layers[0]].float()
    out: dict[str, list[float]] = {}
    for method in methods:
        vals = []
        for sp in progress(sparsities, desc=f"sparsity {method}", enabled=show_progress):
            sv = S.apply(vector, S.keep_mask(method, sp, s, r.float(), seed=seed))
            texts = generate(lm, prompts, vector=sv, alpha=alpha, max_new_tokens=max_new_tokens, batch_size=batch_size)
            vals.append(float(np.mean(scorer(texts))))
        out[method] = vals
    return out
