"""Step ``equivalence``: paper C's |d| < 0.2, decided per trait (:mod:`steerscope.analyses.equivalence`).

For each trait (its primary scorer) and alpha, on the neutral prompts: ``v + v_perp`` against ``v`` and,
with ``pca_paper`` among the methods, paper C's PCA vector against DIM (both ``v`` conditions). Scores are
tables [prompts seeds] paired by prompt and seed; the test is a TOST on Cohen's d at ``cfg.margin`` with a
cluster bootstrap over prompts; the family (every row's equivalence and difference p-values) is
Holm-corrected. The guard (``v`` against no steering, same test) is reported beside each row.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from steerscope.analyses.equivalence import ClusterTost, cluster_tost, decide
from steerscope.studies.identifiability.config import Config
from steerscope.studies.identifiability.records import EquivalenceRecord, EquivalenceRow

ScoreCells = Mapping[str, dict[str, dict[str, list[float]]]]
N_BOOT = 2000


def table(cfg: Config, scores: ScoreCells, trait: str, method: str, kind: str, cond: str) -> np.ndarray | None:
    """Scores of one condition as [prompts seeds] (neutral prompts); None when a seed's cell lacks it."""
    cols = []
    for seed in cfg.seeds:
        cell = scores.get(f"{trait}|{method}|{seed}|neutral")
        if cell is None or cond not in cell.get(kind, {}):
            return None
        cols.append(cell[kind][cond])
    return np.array(cols, float).T


def _pairs(cfg: Config, scores: ScoreCells, trait: str, kind: str, a: float
           ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The comparisons of one trait and alpha whose tables exist: (name, A, B)."""
    m0 = cfg.methods[0]
    v = table(cfg, scores, trait, m0, kind, f"v@{a:g}")
    out: list[tuple[str, np.ndarray, np.ndarray]] = []
    if v is None:
        return out
    vsum = table(cfg, scores, trait, m0, kind, f"v+v_perp@{a:g}")
    if vsum is not None:
        out.append(("v+v_perp vs v", vsum, v))
    pca = table(cfg, scores, trait, "pca_paper", kind, f"v@{a:g}") if "pca_paper" in cfg.methods else None
    if pca is not None:
        out.append((f"v[pca_paper] vs v[{m0}]", pca, v))
    return out


def equivalence(cfg: Config, scores: ScoreCells, primary: Mapping[str, str | None]) -> EquivalenceRecord:
    """The decided rows (see the module docstring); traits without a usable scorer are left out."""
    found: list[tuple[str, float, str, str, ClusterTost, ClusterTost]] = []
    for trait in cfg.traits:
        kind = primary.get(trait)
        none = table(cfg, scores, trait, "none", kind, "none@0") if kind else None
        if kind is None or none is None:
            continue
        for a in cfg.alphas:
            pairs = _pairs(cfg, scores, trait, kind, a)
            if not pairs:
                continue
            guard = cluster_tost(pairs[0][2], none, cfg.margin, N_BOOT, cfg.seed)
            for name, x, y in pairs:
                found.append((trait, a, name, kind, cluster_tost(x, y, cfg.margin, N_BOOT, cfg.seed), guard))
    verdicts = decide([f[4] for f in found])
    rows = [EquivalenceRow(t, a, name, kind, test, v, pe, pd, guard, guard.ci95[0] > 0 or guard.ci95[1] < 0)
            for (t, a, name, kind, test, guard), (v, pe, pd) in zip(found, verdicts)]
    return EquivalenceRecord(cfg.margin, rows, 2 * len(rows))
