"""HTML report and JSON summary of the identifiability study (from step records only; no model code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from steerscope.analyses.identifiability import Spectrum
from steerscope.metrics.classifiers import MIN_ACCURACY
from steerscope.report.html import Report, plt_figure
from steerscope.runs import Run
from steerscope.studies.identifiability.config import Config
from steerscope.studies.identifiability.records import (
    Conclusion,
    EffectsRecord,
    EquivalenceRecord,
    Generations,
    LogitsRecord,
    NullspaceRecord,
    ScorersRecord,
    Scores,
    VectorsRecord,
)


def conclusions(eff: EffectsRecord) -> list[Conclusion]:
    """Rows that count: usable primary scorer; one line each with the verdict."""
    out = []
    for pset, rows in eff.sets().items():
        for r in rows:
            if r.primary:
                out.append(Conclusion(pset, r.trait, r.method, r.alpha, r.scorer, r.v_vs_none.dci(),
                                      r.v_vs_none.real_effect, r.vperp_sum_vs_v.dci(), r.vperp_vs_none.dci(),
                                      r.vperp_sum_vs_v.corr, r.vperp_sum_vs_v.jsd, r.verdict))
    return out


def summary(cfg: Config, vrec: VectorsRecord, srec: ScorersRecord, eff: EffectsRecord, lrec: LogitsRecord,
            nrec: NullspaceRecord, eq: EquivalenceRecord | None = None) -> dict[str, Any]:
    """The ``--json`` summary: vectors, scorer validity, verdicts, decided equivalence, next-token agreement,
    spectral ranks (not a behavioural null space)."""
    concl = conclusions(eff)
    counted = [c for c in concl if c.v_real_effect and c.prompts == "neutral"]
    equiv = [c for c in counted if c.verdict.startswith(("equivalent", "no detected"))]
    return {
        "layer": vrec.layer, "inject_layer": vrec.inject_layer, "norms": vrec.norms,
        "scorers": {t: [s.to_dict() for s in rows] for t, rows in srec.scorers.items()}, "primary_scorer": srec.primary,
        "cos_methods": vrec.cos_methods,
        "conclusions": [c.to_dict() for c in concl],
        "equivalence": eq.to_dict() if eq else None,
        "n_conditions_with_real_effect": len(counted),
        "n_without_detected_difference": len(equiv),
        "logit_vsum_vs_v": [r.to_dict() for r in lrec.agreement if r.vs == "v+v_perp" and r.prompts == "neutral"],
        "subspaces": [r.to_dict() for r in lrec.subspaces],
        "spectral_rank": {
            kind: {l: {"rank_threshold": s.rank_threshold, "rank_entropy": round(s.rank_entropy, 1),
                       "null_fraction_threshold": round(s.null_fraction_threshold, 3),
                       "null_fraction_entropy": round(s.null_fraction_entropy, 3)}
                   for l, s in spectra.items()} for kind, spectra in _spectra(nrec).items()},
        "paper_c_probe_null_fraction": {l: x.to_dict() for l, x in nrec.probe_null.items()},
        "fd_check_rel_err": nrec.fd_check.rel_err if nrec.fd_check else None,
        "J_vperp_over_J_v": {t: x.to_dict() for t, x in nrec.J_vperp_over_J_v.items()},
    }


def _spectra(nrec: NullspaceRecord) -> dict[str, dict[str, Spectrum]]:
    return {"covariance": nrec.covariance, "jacobian": nrec.jacobian}


def _hist_figure(cfg: Config, scores: Scores, kind: str, trait: str, alpha: float) -> Any:
    fig = plt_figure(figsize=(6, 3.2))
    ax = fig.add_subplot(111)
    m = cfg.methods[0]
    series: dict[str, list[float]] = {}
    for seed in cfg.seeds:
        none = scores.cells.get(f"{trait}|none|{seed}|neutral")
        cell = scores.cells.get(f"{trait}|{m}|{seed}|neutral")
        if none is None or cell is None:
            continue
        series.setdefault("none", []).extend(none[kind]["none@0"])
        for c in ("v", "v+v_perp", "v_perp"):
            series.setdefault(c, []).extend(cell[kind][f"{c}@{alpha:g}"])
    allv = np.concatenate([np.array(v) for v in series.values()]) if series else np.zeros(1)
    bins = np.linspace(allv.min(), allv.max() + 1e-9, 12)
    for name, vals in series.items():
        ax.hist(vals, bins=bins, histtype="step", linewidth=1.6, label=name)
    ax.set_xlabel(f"{trait} score ({kind})")
    ax.set_ylabel("count")
    ax.set_title(f"{trait}, {m}, alpha={alpha:g}")
    ax.legend(fontsize=8)
    return fig


def _spectra_figure(nrec: NullspaceRecord) -> Any:
    fig = plt_figure(figsize=(9, 3.4))
    for i, (kind, spectra) in enumerate(_spectra(nrec).items()):
        ax = fig.add_subplot(1, 2, i + 1)
        for l, s in spectra.items():
            sig = np.array(s.sigma)
            ax.semilogy(sig / sig.max(), label=f"layer {l}")
        ax.axhline(0.05, color="k", linestyle=":", linewidth=1)
        ax.set_title(f"{kind} spectrum (sigma / sigma_max)")
        ax.set_xlabel("index")
        ax.legend(fontsize=8)
    return fig


def write(run: Run, cfg: Config, vrec: VectorsRecord, srec: ScorersRecord, gens: dict[str, Generations], scores: Scores,
          eff: EffectsRecord, lrec: LogitsRecord, nrec: NullspaceRecord, eq: EquivalenceRecord | None = None) -> Path:
    """Write ``report.html`` in the run folder and return its path."""
    r = Report("Identifiability of steering vectors")
    r.p(f"Model {cfg.model}; vectors extracted at hidden_states[{vrec.layer}] (last prompt token), injected at "
        f"resid_pre of block {vrec.inject_layer} (offset {cfg.offset}), positions {cfg.positions}. Conditions: v, v + v_perp, "
        f"v_perp (random, orthogonal to v, |v_perp| = |v|, a fresh one per seed), none. Seeds {list(cfg.seeds)}, "
        f"{cfg.n_prompts} neutral prompts, {cfg.max_new_tokens} new tokens, temperature {cfg.temperature}.")
    r.h2("Vectors")
    r.table(["vector", "norm"], [[k, v] for k, v in vrec.norms.items()])
    r.table(["trait", "cos(DIM, PCA)"], [[k, v] for k, v in vrec.cos_dim_pca.items()])
    r.table(["pair", "cos(DIM, DIM)"], [[k, v] for k, v in vrec.cos_traits.items()])
    if vrec.cos_methods:
        r.table(["trait | method", "cos(DIM, method)"], [[k, v] for k, v in vrec.cos_methods.items()],
                caption="extraction choices on the same activations; pca_paper = paper C's PCA (centred, unit norm, "
                        "sign as the SVD gives it; pca_paper_flipped, when run, is its negation)")
    r.h2("Classifier validation")
    r.p(f"Each scorer is validated on the shipped labelled texts (80 per trait). Lexicon and zero-shot scorers are not "
        f"fitted to them; the probe's accuracy is 5-fold cross-validated. Scorers under {MIN_ACCURACY:.0%} are NOT used "
        f"for conclusions (enforced). Primary scorer per trait = most accurate usable one: {srec.primary}.")
    r.table(["trait", "scorer", "accuracy", "validation", "used for conclusions"],
            [[t, s.kind, s.accuracy, s.validation, "yes" if s.usable else "NO (< 80%)"]
             for t, rows in srec.scorers.items() for s in rows])
    r.h2("Behavioural equivalence (primary scorer)")
    r.p("Cohen's d with percentile-bootstrap 95% CIs (2000 resamples, rows paired by prompt and seed); corr = Pearson "
        "correlation of paired scores of v+v_perp and v; JSD of 10-bin score histograms. Guard: an equivalence claim "
        "counts only where v has a real effect (d >= 0.5, CI excluding 0) with a usable scorer.")
    concl = conclusions(eff)
    r.table(["prompts", "trait", "method", "alpha", "scorer", "d(v vs none)", "d(v+v_perp vs v)", "d(v_perp vs none)",
             "corr", "JSD", "verdict"],
            [[c.prompts, c.trait, c.method, c.alpha, c.scorer, c.d_v_vs_none, c.d_vsum_vs_v,
              c.d_vperp_vs_none, "-" if c.corr is None else c.corr, c.jsd, c.verdict] for c in concl])
    if eq is not None:
        _equivalence_section(r, eq)
    r.h3("All scorers (including unusable ones, for reference)")
    r.table(["prompts", "trait", "alpha", "scorer", "usable", "d(v vs none)", "d(v+v_perp vs v)", "d(v_perp vs none)"],
            [[p, x.trait, x.alpha, x.scorer, x.usable, x.v_vs_none.dci(), x.vperp_sum_vs_v.dci(),
              x.vperp_vs_none.dci()] for p, rows in eff.sets().items() for x in rows])
    for t in cfg.traits:
        if kind := srec.primary[t]:
            r.figure(_hist_figure(cfg, scores, kind, t, cfg.probe_alpha), f"score histograms, {t}")
    _agreement_section(r, lrec)
    r.h3("Random k-dim orthogonal subspaces")
    r.p(f"For each k, a random k-dim subspace orthogonal to v; each basis direction u_i gives v + |v| u_i. Mean and "
        f"worst case over the k directions ({cfg.n_k_prompts} prompts).")
    r.table(["trait", "alpha", "k", "mean top-1", "worst top-1", "worst top-10", "mean L2", "max L2"],
            [[x.trait, x.alpha, x.k, x.mean_top1, x.worst_top1, x.worst_top10, x.mean_l2, x.max_l2]
             for x in lrec.subspaces])
    _nullspace_section(r, cfg, nrec)
    r.h2("Samples")
    for key, gen in list(gens.items())[:4]:
        r.h3(key)
        r.pre("\n\n".join(f"[{c}] {texts[0].strip()[:300]}" for c, texts in gen.texts.items()))
    return r.write(run.path("report.html"))


def _agreement_section(r: Report, lrec: LogitsRecord) -> None:
    r.h2("Next-token agreement")
    r.p("Last-token logits of chat-formatted prompts with a*v added, compared with a*(other vector): L2 distance, "
        "top-1 agreement with its 95 % interval (prompts resampled with their draws), top-10 overlap (means over "
        "prompts; v+v_perp and random over seeds).")
    r.table(["trait", "prompts", "alpha", "v vs", "prompts x draws", "L2", "top-1 [95% CI]", "top-10"],
            [[x.trait, x.prompts, x.alpha, x.vs, f"{x.n_prompts} x {x.n_draws}" if x.n_prompts else "",
              x.l2, f"{x.top1:.3f}" + (f" [{x.top1_ci95[0]:.3f}, {x.top1_ci95[1]:.3f}]" if x.top1_ci95 else ""),
              x.top10] for x in lrec.agreement])


def _equivalence_section(r: Report, eq: EquivalenceRecord) -> None:
    r.h3(f"Equivalence decided: TOST at |d| < {eq.margin:g}, cluster bootstrap over prompts, Holm over "
         f"{eq.family_size} tests")
    r.p("d = Cohen's d of the first condition over the second on prompts x seeds; the 90 % interval is the TOST's "
        "(percentile, prompts resampled with their seeds). Verdict: equivalent (Holm p_equiv < 0.05), different "
        "(Holm p_diff < 0.05 and |d| >= margin), else undecided. Guard: d(v vs none) with its 95 % interval; an "
        "equivalence where v does not move the score says nothing.")
    r.table(["trait", "alpha", "comparison", "scorer", "prompts x seeds", "d", "90% CI", "p_equiv (Holm)",
             "p_diff (Holm)", "verdict", "guard d(v vs none) [95% CI]"],
            [[x.trait, x.alpha, x.comparison, x.scorer, f"{x.test.n_prompts} x {x.test.n_seeds}", round(x.test.d, 3),
              f"[{x.test.ci90[0]:+.2f}, {x.test.ci90[1]:+.2f}]", x.p_equiv_holm, x.p_diff_holm, x.verdict,
              f"{x.guard.d:+.2f} [{x.guard.ci95[0]:+.2f}, {x.guard.ci95[1]:+.2f}]"] for x in eq.rows])
    if eq.vperp_ratios:
        r.table(["trait", "alpha", "scorer", "prompts x seeds", "mean none / v / v_perp", "|mean(v_perp)| / |mean(v)| "
                 "[95% CI]", "(v_perp - none) / (v - none) [95% CI]"],
                [[x.trait, x.alpha, x.scorer, f"{x.n_prompts} x {x.n_seeds}",
                  f"{x.mean_none:.3f} / {x.mean_v:.3f} / {x.mean_vperp:.3f}",
                  f"{x.ratio_paper:.3f} [{x.ratio_paper_ci95[0]:.3f}, {x.ratio_paper_ci95[1]:.3f}]",
                  f"{x.ratio_shift:+.3f} [{x.ratio_shift_ci95[0]:+.3f}, {x.ratio_shift_ci95[1]:+.3f}]"]
                 for x in eq.vperp_ratios],
                caption="v_perp alone (descriptive, not in the Holm family): paper C's ratio of raw mean scores (it "
                        "depends on where the scorer puts 0) and the share of v's shift that v_perp alone gives")


def _nullspace_section(r: Report, cfg: Config, nrec: NullspaceRecord) -> None:
    r.h2("Spectral rank (not a behavioural null space)")
    r.p(f"Activation covariance of resid_pre over {nrec.n_tokens} prompt tokens (first token of each text dropped); "
        f"Jacobian of last-token logits w.r.t. resid_pre at the last token (mean singular values over "
        f"{cfg.n_jac_prompts} prompts). Effective rank: #sigma > 0.05 sigma_max (paper C) and exp(entropy) of "
        f"sigma / sum sigma; 'null fraction' = 1 - rank / d_model. A low covariance rank says the stream barely varies "
        f"along most directions, not that steering along them does nothing; the Jacobian's is a first-order, "
        f"one-token statement about the logits.")
    if nrec.probe_null:
        r.table(["layer", "probes", "rank of probed J", "(probes - rank) / probes", "1 - rank / d_model (Jacobian)"],
                [[l, x.n_probes, x.rank, x.null_fraction, nrec.jacobian[l].null_fraction_threshold]
                 for l, x in nrec.probe_null.items()],
                caption="paper C's definition (its code: 1000 random unit probes, one prompt) beside the project's; "
                        "the probe rank is at most d_model, so with 1000 probes the paper's fraction is >= 1 - d/1000")
    r.table(["method", "layer", "rank (>5% max)", "null frac", "entropy rank", "null frac (entropy)"],
            [[k, l, s.rank_threshold, s.null_fraction_threshold, s.rank_entropy, s.null_fraction_entropy]
             for k, spectra in _spectra(nrec).items() for l, s in spectra.items()])
    r.figure(_spectra_figure(nrec), "normalised spectra; dotted line = 5% threshold")
    if nrec.fd_check:
        r.p(f"Finite-difference check at layer {nrec.fd_check.layer}: relative error of J u vs central "
            f"differences for 3 random unit probes: {[round(e, 4) for e in nrec.fd_check.rel_err]}.")
    if nrec.J_vperp_over_J_v:
        r.table(["trait", "|J v|", "|J v_perp|", "ratio"],
                [[t, x.J_v, x.J_vperp, x.ratio] for t, x in nrec.J_vperp_over_J_v.items()],
                caption="first-order logit change: orthogonal perturbation vs v (Jacobian at the extraction layer)")
