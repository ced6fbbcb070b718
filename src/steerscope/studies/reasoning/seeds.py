"""The headline (penultimate-layer vector vs the unsteered model) over several training seeds.

Seed ``cfg.seed`` is the study's own ``train_L<l>``; seeds ``cfg.seed + 1 ..`` retrain the same
layer on the same problems with other sampling seeds (and prompt order), evaluated greedily on the
same test set, so every seed's difference to the base model is paired on the same problems.
"""

from __future__ import annotations

import statistics
from functools import partial

from steerscope.models.load import LM
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import EvalRecord, SeedRow, SeedRun, SeedsSummary
from steerscope.studies.reasoning.task import Problem


def seed_runs(run: Run, lm: LM, cfg: ReasoningConfig, layer: int, test: list[Problem],
              only: list[int] | None = None) -> dict[int, SeedRun]:
    """Train and evaluate ``L<layer>_seed<s>`` for the extra seeds (or those in ``only``); resumable steps.

    Example:
        >>> seed_runs(run, lm, cfg, 28, test)[1].eval.greedy_acc
    """
    out: dict[int, SeedRun] = {}
    for s in range(cfg.seed + 1, cfg.seed + cfg.seeds):
        if only is not None and s not in only:
            continue
        name = rc.seed_name(layer, s)
        t = run.record(rc.train_step(name), rc.TrainRecord,
                       partial(st.train_vector, run, lm, cfg, name, [layer], train_seed=s))
        if t is None:  # --report-only and not trained yet
            continue
        vec = st.load_vector(run, name)
        ev = run.record(rc.eval_step(name), EvalRecord, partial(st.evaluate, lm, test, cfg, name, vec, samples=0))
        if ev is None:
            continue
        out[s] = SeedRun(s, ev, t.norms.get(str(layer)))
    return out


def seeds_summary(base: EvalRecord, per_seed: dict[str, SeedRun]) -> SeedsSummary:
    """Per seed: greedy accuracy, paired difference to base (95% CI), McNemar p; mean and spread of Δ.

    Args:
        base: the base model's evaluation record.
        per_seed: each seed's run by label.

    Example:
        >>> seeds_summary(base, {"seed 0": SeedRun(0, ev)}).rows[0].diff
    """
    rows = []
    for label, r in per_seed.items():
        ev = r.eval
        d = paired_diff(base.greedy, ev.greedy)
        gained = sum(1 for a, b in zip(base.greedy, ev.greedy) if b > a)
        lost = sum(1 for a, b in zip(base.greedy, ev.greedy) if a > b)
        rows.append(SeedRow(label, r.seed, ev.greedy_acc, ev.greedy_ci, d, mcnemar_p(base.greedy, ev.greedy), gained,
                            lost, r.norm))
    ds = [r.diff[0] for r in rows]
    return SeedsSummary(rows, base.n, base.greedy_acc, statistics.fmean(ds) if ds else None,
                        statistics.stdev(ds) if len(ds) > 1 else None, min(ds) if ds else None,
                        max(ds) if ds else None, sum(1 for r in rows if r.diff[1] > 0))
