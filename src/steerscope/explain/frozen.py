"""Card section ``frozen``: how much of the effect survives when a path is cut (paper A, Table 1).

For each ablation (QK frozen, OV frozen, svv removed, MLP input s removed; :mod:`steerscope.analyses.frozen`):
the teacher-forced effect retained (:mod:`steerscope.explain.behaviour`) with a 95 % bootstrap
interval over prompts (a ratio of means, prompts resampled), the fraction of the
steered greedy continuation's tokens its own greedy generation reproduces (and that fraction
rescaled so the unsteered continuation scores 0), and with a scorer its mean on those texts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from steerscope.analyses import frozen as F
from steerscope.explain import intervals
from steerscope.explain.behaviour import Behaviour, frozen_metric, tokens_reproduced
from steerscope.explain.context import Context, ScoreFn
from steerscope.explain.records import FrozenPath, FrozenRecord
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.vector import SteeringVector

ABLATIONS = ("qk", "ov", "svv", "mlp")


def generations(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, modes: Sequence[str],
                max_new_tokens: int, batch_size: int = 16, show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Greedy new-token ids [n new] per mode: ``unsteered``, ``none`` (steered) or an ablation."""
    out: dict[str, torch.Tensor] = {}
    for mode in progress(modes, desc="frozen generation", enabled=show_progress):
        a, m = (0.0, "none") if mode == "unsteered" else (alpha, mode)
        parts = [F.frozen_generate_ids(lm, prompts[i:i + batch_size], vector, a, m, max_new_tokens)
                 for i in range(0, len(prompts), batch_size)]
        out[mode] = _cat(parts, lm.tokenizer.pad_token_id)
    return out


def _cat(parts: list[torch.Tensor], pad: int | None) -> torch.Tensor:
    n = max(p.shape[1] for p in parts)
    fill = 0 if pad is None else pad
    return torch.cat([torch.cat([p, p.new_full((p.shape[0], n - p.shape[1]), fill)], 1) for p in parts])


def scored(lm: LM, ids: dict[str, torch.Tensor], scorer: ScoreFn) -> dict[str, float]:
    """{mode: mean scorer value of the decoded generations}."""
    return {m: float(np.mean(scorer(lm.tokenizer.batch_decode(t, skip_special_tokens=True)))) for m, t in ids.items()}


def section(ctx: Context, beh: Behaviour) -> FrozenRecord:
    """The ``frozen`` record: ``qk``, ``ov``, ``svv``, ``mlp`` (effect retained with its interval, etc.)."""
    lm, st = ctx.lm, ctx.settings
    ids = generations(lm, ctx.prompts, ctx.vector, ctx.alpha, ("none", "unsteered", *ABLATIONS), st.gen_tokens,
                      16, ctx.show_progress)
    eos, pad = lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id
    base = tokens_reproduced(ids["none"], ids["unsteered"], eos, pad)
    sc = scored(lm, ids, ctx.scorer) if ctx.scorer is not None else {}
    ms, mb = beh.m_steer.double().numpy(), beh.m_base.double().numpy()
    paths = {}
    for mode in ABLATIONS:
        tr = tokens_reproduced(ids["none"], ids[mode], eos, pad)
        m = frozen_metric(lm, beh.pb, ctx.vector, ctx.alpha, mode, st.batch_size).double().numpy()
        paths[mode] = FrozenPath(intervals.ratio(m, ms, mb, st.n_boot, st.seed), tr,
                                 (tr - base) / (1 - base) if base < 1 else float("nan"), sc.get(mode))
    return FrozenRecord(**paths, steered_scorer_mean=sc.get("none"), unsteered_tokens_reproduced=base,
                        unsteered_scorer_mean=sc.get("unsteered"), gen_tokens=st.gen_tokens,
                        samples={m: lm.tokenizer.batch_decode(ids[m][:2], skip_special_tokens=True) for m in ids})
