"""Card section ``identifiability``: is s the only vector that does what s does? (paper C)

1. For each seed, v_perp: a uniformly random direction orthogonal to s with |v_perp| = |s|
   (:func:`steerscope.identifiability.random_orthogonal`). The teacher-forced effect retained
   (relative to s, same alpha) of s + v_perp and of v_perp alone, averaged over seeds per prompt,
   with a percentile bootstrap 95 % CI over prompts.
2. Null space at the layer, covariance method: singular values of the covariance of resid_pre
   at the layer over neutral-prompt tokens; null fraction = 1 - effective rank / d_model, by the
   0.05 sigma_max threshold and by the entropy rank (:func:`steerscope.identifiability.spectrum`).
   With fewer tokens than d_model the rank is bounded by the token count (``n_tokens`` says).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from steerscope import identifiability as idf
from steerscope.explain.behaviour import Behaviour, metric_of
from steerscope.explain.context import Context
from steerscope.explain.dose import neutral_prompts
from steerscope.record import recording
from steerscope.sites import Site
from steerscope.vector import SteeringVector


def ratio_ci(mx: np.ndarray, ms: np.ndarray, mb: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(mean mx - mean mb) / (mean ms - mean mb) with a percentile bootstrap 95 % CI over prompts."""
    def ratio(i: np.ndarray) -> float:
        den = ms[i].mean() - mb[i].mean()
        return float((mx[i].mean() - mb[i].mean()) / den) if abs(den) > 1e-9 else float("nan")
    rng = np.random.default_rng(seed)
    boots = np.array([ratio(rng.integers(0, len(mx), len(mx))) for _ in range(n_boot)])
    boots = boots[np.isfinite(boots)]
    lo, hi = (np.quantile(boots, [0.025, 0.975]) if boots.size else (np.nan, np.nan))
    return ratio(np.arange(len(mx))), float(lo), float(hi)


@torch.no_grad()
def null_space(ctx: Context) -> dict[str, Any]:
    """Covariance spectrum of resid_pre at the layer over neutral-prompt tokens (first tokens dropped)."""
    lm, site = ctx.lm, Site(ctx.layer, "resid_pre")
    prompts = neutral_prompts(ctx.settings.n_cov_prompts)
    rows = []
    for i in range(0, len(prompts), 16):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i:i + 16]], padding_side="left")
        m = enc["attention_mask"].bool().clone()
        m[torch.arange(len(m)), m.float().argmax(1)] = False
        with recording(lm, [site]) as cache:
            lm.model(**enc, use_cache=False)
        rows.append(cache[site][m].float().cpu())
    x = torch.cat(rows)
    spec = idf.spectrum(idf.covariance_singular_values(x).numpy(), lm.d_model)
    rec = asdict(spec)
    rec.pop("sigma")
    return {**rec, "n_tokens": len(x), "rank_bounded_by_tokens": len(x) - 1 < lm.d_model}


def section(ctx: Context, beh: Behaviour) -> dict[str, Any]:
    """The ``identifiability`` record."""
    st = ctx.settings
    v = ctx.vector[ctx.layer].float().cpu()
    runs: dict[str, list[np.ndarray]] = {"v_plus_perp": [], "perp_only": []}
    for seed in st.perp_seeds:
        p = idf.random_orthogonal(v, seed=seed)
        for key, d in (("v_plus_perp", v + p), ("perp_only", p)):
            sv = SteeringVector({ctx.layer: d}, site=ctx.vector.site)
            runs[key].append(metric_of(ctx.lm, beh.pb, sv, ctx.alpha, batch_size=st.batch_size).double().numpy())
    ms, mb = beh.m_steer.double().numpy(), beh.m_base.double().numpy()
    out: dict[str, Any] = {"seeds": list(st.perp_seeds), "n_prompts": len(ms)}
    for key, vals in runs.items():
        r, lo, hi = ratio_ci(np.mean(vals, 0), ms, mb, st.n_boot, st.seed)
        out[key] = {"effect_relative": r, "ci95": [lo, hi]}
    out["null_space"] = null_space(ctx)
    out["null_fraction"] = out["null_space"]["null_fraction_threshold"]
    return out
