"""The headline (penultimate-layer vector vs the unsteered model) over several training seeds.

Seed ``cfg.seed`` is the study's own ``train_L<l>``; seeds ``cfg.seed + 1 ..`` retrain the same
layer on the same problems with other sampling seeds (and prompt order), evaluated greedily on the
same test set, so every seed's difference to the base model is paired on the same problems.
"""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any

from steerscope.models.load import LM
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig


def seed_runs(run: Run, lm: LM, cfg: ReasoningConfig, layer: int, test: list[Any],
              only: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """Train and evaluate ``L<layer>_seed<s>`` for the extra seeds (or those in ``only``); resumable steps.

    Returns ``{seed: {"seed", "eval", "norm"}}``.
    """
    out: dict[int, dict[str, Any]] = {}
    for s in range(cfg.seed + 1, cfg.seed + cfg.seeds):
        if only is not None and s not in only:
            continue
        name = f"L{layer}_seed{s}"
        t = run.step(f"train_{name}", partial(st.train_vector, run, lm, cfg, name, [layer], train_seed=s))
        if t is None:  # --report-only and not trained yet
            continue
        vec = st.load_vector(run, name)
        ev = run.step(f"eval_{name}", partial(st.evaluate, lm, test, cfg, name, vec, samples=0))
        if ev is None:
            continue
        out[s] = {"seed": s, "eval": ev, "norm": t["norms"].get(str(layer))}
    return out


def seeds_summary(base: dict[str, Any], per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per seed: greedy accuracy, paired difference to base (95% CI), McNemar p; mean and spread of Δ.

    Args:
        base: the base model's evaluation record.
        per_seed: ``{label: {"seed": s, "eval": record, "norm": ‖s‖}}``.
    """
    rows = []
    for label, r in per_seed.items():
        ev = r["eval"]
        d = paired_diff(base["greedy"], ev["greedy"])
        gained = sum(1 for a, b in zip(base["greedy"], ev["greedy"]) if b > a)
        lost = sum(1 for a, b in zip(base["greedy"], ev["greedy"]) if a > b)
        rows.append({"label": label, "seed": r["seed"], "greedy_acc": ev["greedy_acc"], "greedy_ci": ev["greedy_ci"],
                     "diff": d, "mcnemar_p": mcnemar_p(base["greedy"], ev["greedy"]), "gained": gained,
                     "lost": lost, "norm": r.get("norm")})
    ds = [r["diff"][0] for r in rows]
    return {"rows": rows, "n": base["n"], "base_acc": base["greedy_acc"],
            "mean_diff": statistics.fmean(ds) if ds else None,
            "sd_diff": statistics.stdev(ds) if len(ds) > 1 else None,
            "min_diff": min(ds) if ds else None, "max_diff": max(ds) if ds else None,
            "n_significant": sum(1 for r in rows if r["diff"][1] > 0)}
