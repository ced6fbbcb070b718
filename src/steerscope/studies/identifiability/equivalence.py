"""Step ``equivalence``: paper C's |d| < 0.2, decided per trait (:mod:`steerscope.analyses.equivalence`).

For each trait (its primary scorer) and alpha, on the neutral prompts: ``v + v_perp`` against ``v`` and,
with ``pca_paper`` / ``pca_paper_flipped`` among the methods, paper C's PCA vector (its SVD sign, or that sign
flipped) against DIM (both ``v`` conditions). Scores are
tables [prompts seeds] paired by prompt and seed; the test is a TOST on Cohen's d at ``cfg.margin`` with a
cluster bootstrap over prompts; the family (every row's equivalence and difference p-values) is
Holm-corrected. The guard (``v`` against no steering, same test) is reported beside each row. Beside the
family, descriptively: paper C's ratio |mean(v_perp)| / |mean(v)| and the shift ratio, with intervals.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from steerscope.analyses.equivalence import ClusterTost, cluster_tost, decide
from steerscope.stats import cluster_bootstrap, ratio_of_means_ci
from steerscope.studies.identifiability.config import PCA_PAPER, Config
from steerscope.studies.identifiability.records import EquivalenceRecord, EquivalenceRow, VperpRatio

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
    for method in (m for m in PCA_PAPER if m in cfg.methods):
        pca = table(cfg, scores, trait, method, kind, f"v@{a:g}")
        if pca is not None:
            out.append((f"v[{method}] vs v[{m0}]", pca, v))
    return out


def vperp_ratio(trait: str, alpha: float, scorer: str, none: np.ndarray, v: np.ndarray, vperp: np.ndarray,
                seed: int = 0) -> VperpRatio:
    """Paper C's |mean(v_perp)| / |mean(v)| and the shift ratio, each with a 95 % cluster-bootstrap interval.

    Args:
        none, v, vperp: scores [prompts seeds] (``none`` is averaged over its seeds per prompt).
    """
    mv, mp = v.mean(axis=1), vperp.mean(axis=1)

    def paper(idx: np.ndarray) -> float:
        den = abs(float(mv[idx].mean()))
        return abs(float(mp[idx].mean())) / den if den >= 1e-12 else float("nan")

    shift = ratio_of_means_ci(vperp, mv, none.mean(axis=1), N_BOOT, seed=seed)
    return VperpRatio(trait, alpha, scorer, v.shape[0], v.shape[1], float(none.mean()), float(v.mean()),
                      float(vperp.mean()), paper(np.arange(len(mv))), cluster_bootstrap(paper, len(mv), N_BOOT, seed=seed),
                      shift[0], (shift[1], shift[2]))


def equivalence(cfg: Config, scores: ScoreCells, primary: Mapping[str, str | None]) -> EquivalenceRecord:
    """The decided rows (see the module docstring); traits without a usable scorer are left out."""
    found: list[tuple[str, float, str, str, ClusterTost, ClusterTost]] = []
    ratios: list[VperpRatio] = []
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
            vperp = table(cfg, scores, trait, cfg.methods[0], kind, f"v_perp@{a:g}")
            if vperp is not None:
                ratios.append(vperp_ratio(trait, a, kind, none, pairs[0][2], vperp, cfg.seed))
            for name, x, y in pairs:
                found.append((trait, a, name, kind, cluster_tost(x, y, cfg.margin, N_BOOT, cfg.seed), guard))
    verdicts = decide([f[4] for f in found])
    rows = [EquivalenceRow(t, a, name, kind, test, v, pe, pd, guard, guard.ci95[0] > 0 or guard.ci95[1] < 0)
            for (t, a, name, kind, test, guard), (v, pe, pd) in zip(found, verdicts)]
    return EquivalenceRecord(cfg.margin, rows, 2 * len(rows), ratios)
