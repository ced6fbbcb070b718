"""Card section ``identifiability``: is s the only vector that does what s does? (paper C)

1. For each seed, v_perp: a uniformly random direction orthogonal to s with |v_perp| = |s|
   (:func:`steerscope.analyses.identifiability.random_orthogonal`). The teacher-forced effect retained
   (relative to s, same alpha) of s + v_perp and of v_perp alone, averaged over seeds per prompt,
   with a 95 % cluster-bootstrap interval (a prompt's row of draws is one cluster) and the 90 %
   interval of the equivalence test (TOST within 1 ± margin; :mod:`.rules`).
2. Null space at the layer, covariance method: singular values of the covariance of resid_pre
   at the layer over neutral-prompt tokens; null fraction = 1 - effective rank / d_model, by the
   0.05 sigma_max threshold and by the entropy rank (:func:`steerscope.analyses.identifiability.spectrum`).
   With fewer tokens than d_model the rank is bounded by the token count (``n_tokens`` says).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from steerscope import stats
from steerscope.analyses import identifiability as idf
from steerscope.data import neutral_prompts
from steerscope.explain import intervals
from steerscope.explain.behaviour import Behaviour, metric_of
from steerscope.explain.context import Context
from steerscope.explain.records import IdentifiabilityRecord
from steerscope.vector import SteeringVector


def null_space(ctx: Context) -> dict[str, Any]:
    """Covariance spectrum of resid_pre at the layer over neutral-prompt tokens (first tokens dropped)."""
    lm = ctx.lm
    cov = idf.residual_covariance_spectra(lm, neutral_prompts(ctx.settings.n_cov_prompts), [ctx.layer])[ctx.layer]
    rec = asdict(cov.spectrum)
    rec.pop("sigma")
    return {**rec, "n_tokens": cov.n_tokens, "rank_bounded_by_tokens": cov.n_tokens - 1 < lm.d_model}


def section(ctx: Context, beh: Behaviour) -> IdentifiabilityRecord:
    """The ``identifiability`` record: relative effects (clusters: prompts x v_perp draws) and the null space."""
    st = ctx.settings
    v = ctx.vector[ctx.layer].float().cpu()
    runs: dict[str, list[np.ndarray]] = {"v_plus_perp": [], "perp_only": []}
    for seed in st.perp_seeds:
        p = idf.random_orthogonal(v, seed=seed)
        for key, d in (("v_plus_perp", v + p), ("perp_only", p)):
            sv = SteeringVector({ctx.layer: d}, site=ctx.vector.site)
            runs[key].append(metric_of(ctx.lm, beh.pb, sv, ctx.alpha, batch_size=st.batch_size).double().numpy())
    ms, mb = beh.m_steer.double().numpy(), beh.m_base.double().numpy()
    rows = {k: np.stack(v, 1) for k, v in runs.items()}  # [prompts draws]: a prompt is one cluster
    vp, po = (intervals.ratio(rows[k], ms, mb, st.n_boot, st.seed) for k in ("v_plus_perp", "perp_only"))
    _, lo90, hi90 = stats.ratio_of_means_ci(rows["v_plus_perp"], ms, mb, n_boot=st.n_boot,
                                            level=intervals.level_for(len(ms), 0.90), seed=st.seed)
    ns = null_space(ctx)
    return IdentifiabilityRecord(
        seeds=list(st.perp_seeds), n_prompts=len(ms), v_plus_perp=vp, perp_only=po, v_plus_perp_ci90=(lo90, hi90),
        margin=st.equivalence_margin, null_space=ns, null_fraction=ns["null_fraction_threshold"],
        null_space_note=("the activation covariance's effective rank on neutral-prompt tokens (1 - rank / d_model): "
                         "directions the residual stream barely varies along, not a behavioural null space"))
