"""Card section ``sparsity``: how few dimensions of s carry the effect (paper A, §6).

Dimensions are ranked by |IE_vec| = |s ⊙ r| (r: alpha times the mean gradient, from the
attribution section); the bottom k are zeroed (:mod:`steerscope.analyses.sparsity`) and the sparsified
vector's teacher-forced effect retained is measured on the card's batch. The grid is refined by
bisection on k to the largest k that keeps ``sparsity_target`` (90 %) of the effect, giving the
fraction of dimensions needed; its 95 % interval comes from resampling prompts over the sizes
evaluated (so its resolution is the spacing of those sizes, stated in the record). The |s| and random rules with the same k are the baselines.
:func:`scored_curve` (scorer on greedy generations) is shared with the refusal-mechanisms study.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from steerscope import stats
from steerscope.analyses import sparsity as S
from steerscope.explain import intervals
from steerscope.explain.behaviour import Behaviour, metric_of
from steerscope.explain.context import Context, ScoreFn
from steerscope.explain.records import SparsityRecord
from steerscope.generation import generate
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.vector import SteeringVector

BASELINES = ("norm", "random")


def metric_at(ctx: Context, beh: Behaviour, r: torch.Tensor, method: str, k: int) -> np.ndarray:
    """m per prompt [n] with the bottom-k dimensions of ``method`` zeroed."""
    s = ctx.vector[ctx.layer].float()
    keep = S.keep_mask(method, k / s.numel(), s, r, seed=ctx.settings.seed)
    sv = S.apply(ctx.vector, keep)
    return metric_of(ctx.lm, beh.pb, sv, ctx.alpha, batch_size=ctx.settings.batch_size).double().numpy()


def retained_at(ctx: Context, beh: Behaviour, r: torch.Tensor, method: str, k: int) -> float:
    """Effect retained with the bottom-k dimensions of ``method`` zeroed."""
    return beh.retained(torch.from_numpy(metric_at(ctx, beh, r, method, k)))


def needed(ctx: Context, beh: Behaviour, r: torch.Tensor, seen: dict[int, np.ndarray]) -> int:
    """The largest k (dimensions zeroed) whose |IE| effect retained >= the target: grid, then bisection.
    ``seen`` ({k: m per prompt}, the grid) gains every bisection point."""
    st = ctx.settings
    ok = [k for k, m in seen.items() if beh.retained(torch.from_numpy(m)) >= st.sparsity_target]
    lo = max(ok) if ok else 0  # known good (k = 0 is the dense vector)
    higher = [k for k in seen if k > lo]
    hi = min(higher) if higher else lo
    for _ in range(st.bisect_sparsity if hi > lo else 0):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        seen[mid] = metric_at(ctx, beh, r, "ie", mid)
        lo, hi = (mid, hi) if beh.retained(torch.from_numpy(seen[mid])) >= st.sparsity_target else (lo, mid)
    return lo


def _largest_good(seen: dict[int, np.ndarray], ms: np.ndarray, mb: np.ndarray, idx: np.ndarray, target: float) -> int:
    den = ms[idx].mean() - mb[idx].mean()
    good = [k for k, m in seen.items() if abs(den) > 1e-12 and (m[idx].mean() - mb[idx].mean()) / den >= target]
    return max(good, default=0)


def fraction_interval(seen: dict[int, np.ndarray], beh: Behaviour, d: int, target: float, n_boot: int, seed: int
                      ) -> tuple[tuple[float, float], float]:
    """95 % bootstrap interval (prompts resampled) of the fraction needed, on the evaluated sizes, and
    the resolution: the gap (fraction of d) between the answer and the next evaluated size above it."""
    ms, mb = beh.m_steer.double().numpy(), beh.m_base.double().numpy()
    lo, hi = stats.cluster_bootstrap(lambda idx: (d - _largest_good(seen, ms, mb, idx, target)) / d, len(ms),
                                     n_boot=n_boot, level=intervals.level_for(len(ms)), seed=seed)
    k = _largest_good(seen, ms, mb, np.arange(len(ms)), target)
    above = [x for x in seen if x > k]
    return (lo, hi), ((min(above) - k) / d if above else 0.0)


def section(ctx: Context, beh: Behaviour) -> SparsityRecord:
    """The ``sparsity`` record: ``fraction_needed`` for 90 % of the effect, its interval, and the curves."""
    st, d = ctx.settings, ctx.lm.d_model
    r = ctx.load("attribution")["mean_grad"].float()
    ks = [S.n_drop(d, sp) for sp in st.sparsities]
    curves: dict[str, list[float]] = {}
    seen: dict[int, np.ndarray] = {}
    for method in progress(("ie", *BASELINES), desc="sparsity", enabled=ctx.show_progress):
        ms = [metric_at(ctx, beh, r, method, k) for k in ks]
        curves[method] = [beh.retained(torch.from_numpy(m)) for m in ms]
        if method == "ie":
            seen.update(zip(ks, ms))
    k = needed(ctx, beh, r, seen)
    ci, resolution = fraction_interval(seen, beh, d, st.sparsity_target, st.n_boot, st.seed)
    s = ctx.vector[ctx.layer].float()
    return SparsityRecord(
        fraction_needed=(d - k) / d, fraction_ci95=ci, resolution=resolution, n=len(ctx.prompts), dims_needed=d - k,
        target=st.sparsity_target, rule="ie", sparsities=list(st.sparsities), kept_fraction=[(d - x) / d for x in ks],
        effect_retained=curves, top_dims=(s * r).abs().argsort(descending=True)[:10].tolist(),
        scorer=scored_curve(ctx.lm, ctx.prompts, ctx.vector, ctx.alpha, r, ("ie",), st.sparsities, ctx.scorer,
                            st.gen_tokens, 16, st.seed, ctx.show_progress) if ctx.scorer is not None else None)


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
