"""HTML report of the refusal-mechanisms study: tables and figures from the step records only
(:class:`steerscope.studies.refusal_mechanisms.records.StudyRecords`, read by attribute)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from steerscope.circuits.graph import Graph
from steerscope.explain import intervals, rules
from steerscope.explain.records import Claim, Estimate
from steerscope.report.html import Report, plt_figure
from steerscope.runs import Run
from steerscope.stats import holm, mcnemar_p, wilson
from steerscope.studies.refusal_mechanisms import records as rc
from steerscope.studies.refusal_mechanisms.config import Config
from steerscope.studies.refusal_mechanisms.records import AblationsRecord, StudyRecords

MODES = (("none", "steered"), ("qk", "QK frozen"), ("ov", "OV frozen"), ("svv", "svv removed"),
         ("mlp", "MLP input s removed"))


def _faithfulness_fig(recs: dict[str, rc.CircuitsRecord], threshold: float) -> Any:
    fig = plt_figure(figsize=(6, 3.6))
    ax = fig.add_subplot(111)
    for name, r in recs.items():
        frac = [n / r.n_edges_total for n in r.n_edges_pruned]
        ax.plot(frac, r.faithfulness, marker="o", label=f"{name} ({r.setting})")
    ax.axhline(threshold, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("circuit size (fraction of edges, after pruning)")
    ax.set_ylabel("faithfulness")
    ax.legend(fontsize=8)
    return fig


def _circuit_fig(run: Run, rec: rc.CircuitsRecord) -> Any:
    """Layered drawing of the minimal circuit: nodes per layer (heads, MLP), edges as lines."""
    from steerscope.runs import load_tensors

    name, setting = rec.vector, rec.setting
    circ = load_tensors(run.path("tensors", f"{rc.circuit_tensors(name, setting)}.safetensors"))["circuit"]
    g = Graph.from_dict(rec.graph)
    per_up, l0, n_layers = g.n_heads, g.layer0, g.n_layers

    def up_xy(i: int) -> tuple[float, float]:
        n = g.upstream[i]
        if n.kind == "steer":
            return per_up / 2, l0 - 0.6
        return (per_up + 0.8, n.layer + 0.45) if n.kind == "mlp" else (float(n.head or 0), n.layer)

    def recv_xy(j: int) -> tuple[float, float]:
        r = g.receivers[j]
        if r.kind == "logits":
            return per_up / 2, n_layers + 0.3
        if r.kind == "mlp":
            return per_up + 0.8, r.layer + 0.45
        if r.kind == "q":
            return float(r.head or 0), r.layer
        return ((r.head or 0) + 0.5) * per_up / g.n_kv, r.layer
    fig = plt_figure(figsize=(7, 0.35 * (n_layers - l0) + 2))
    ax = fig.add_subplot(111)
    colors = {"q": "tab:blue", "k": "tab:green", "v": "tab:red", "mlp": "tab:purple", "logits": "black"}
    for u, v in circ.nonzero().tolist():
        (x0, y0), (x1, y1) = up_xy(u), recv_xy(v)
        ax.plot([x0, x1], [y0, y1], color=colors[g.receivers[v].kind], lw=0.5, alpha=0.5)
    used = circ.any(1).nonzero()[:, 0].tolist()
    ax.scatter([up_xy(i)[0] for i in used], [up_xy(i)[1] for i in used], s=12, color="k", zorder=3)
    ax.set_xlabel("head index (MLP at right)")
    ax.set_ylabel("layer")
    ax.set_title(f"{name} {setting}: {rec.minimal_edges} edges (blue q, green k, red v, purple MLP, black logits)",
                 fontsize=9)
    return fig


def _ablation_fig(recs: dict[str, AblationsRecord]) -> Any:
    fig = plt_figure(figsize=(7, 3.4))
    ax = fig.add_subplot(111)
    w = 0.38
    for i, (setting, r) in enumerate(recs.items()):
        vals = [r.unsteered] + [r.asr(m) for m, _ in MODES]
        ax.bar([j + i * w for j in range(len(vals))], vals, width=w, label=setting)
    ax.set_xticks([j + w / 2 for j in range(len(MODES) + 1)])
    ax.set_xticklabels(["unsteered"] + [lab for _, lab in MODES], rotation=20, fontsize=8)
    ax.set_ylabel("ASR (non-refusal rate)")
    ax.legend(fontsize=8)
    return fig


def _sparsity_fig(rec: rc.SparsityRecord) -> Any:
    fig = plt_figure(figsize=(6, 3.6))
    ax = fig.add_subplot(111)
    for method, vals in rec.asr.items():
        ax.plot(rec.sparsities, vals, marker="o", label=method)
    if rec.dense_asr is not None:
        ax.axhline(rec.dense_asr, color="grey", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity (fraction of dimensions zeroed)")
    ax.set_ylabel("ASR")
    ax.legend(fontsize=8)
    return fig


def table1_tests(arec: dict[str, AblationsRecord]) -> dict[tuple[str, str], float]:
    """{(setting, ablation): Holm-corrected exact McNemar p of its per-prompt outcomes vs the steered run}
    over every ablation and setting of Table 1 (one family); empty for records without per-prompt outcomes.

    Example:
        >>> table1_tests({"bypass": run.load_record("ablations_bypass", AblationsRecord)})[("bypass", "ov")]
    """
    keys, raw = [], []
    for setting, a in arec.items():
        each = a.each
        if not each:
            continue
        for m in ("unsteered", *(m for m, _ in MODES)):
            if m != "none" and m in each:
                keys.append((setting, m))
                raw.append(mcnemar_p(each["none"], each[m]))
    return dict(zip(keys, holm(raw)))


def discordant(a: AblationsRecord, m: str) -> tuple[int, int] | None:
    """(prompts the steered run wins and ablation ``m`` loses, the reverse): the pairs McNemar rests on.

    Example:
        >>> discordant(run.load_record("ablations_bypass", AblationsRecord), "ov")
    """
    each = a.each
    if not each or m not in each or "none" not in each:
        return None
    pairs = list(zip(each["none"], each[m]))
    return sum(x == 1 and y == 0 for x, y in pairs), sum(x == 0 and y == 1 for x, y in pairs)


def _cell(a: AblationsRecord, m: str, p: float | None) -> str:
    """``ASR [Wilson 95 %] (change in points; McNemar p; discordant pairs b/c of n)``."""
    n, x = a.n, a.asr(m)
    lo, hi = wilson(round(x * n), n)
    parts = [] if m == "unsteered" else [f"{100 * abs(x - a.none):.1f}"]
    if p is not None:
        parts.append(f"p = {p:.2g}")
    bc = discordant(a, m)
    if bc is not None:
        parts.append(f"{bc[0]}/{bc[1]} discordant of {n}")
    return f"{x:.3f} [{lo:.2f}, {hi:.2f}]" + (f" ({'; '.join(parts)})" if parts else "")


def write_report(run: Run, cfg: Config, recs: StudyRecords) -> Path:
    """Build ``report.html`` in the run folder from the finished steps' records.

    Example:
        >>> write_report(run, cfg, StudyRecords.load(run, list(cfg.vectors))).name
        'report.html'
    """
    r = Report("Refusal mechanisms: why steering works")
    r.p(f"Model {cfg.model}; vectors {cfg.vectors}; alpha bypass {cfg.alpha_bypass}, induce {cfg.alpha_induce}; "
        f"Table 1 on {cfg.n_ablate or cfg.n_eval} prompts per setting, sparsity curves on {cfg.n_eval}, "
        f"{cfg.eval_tokens} greedy tokens per ASR completion; EAP-IG on {cfg.n_attr} prompts x "
        f"{cfg.attr_tokens} tokens with T={cfg.steps}.", note=True)
    if recs.exact is not None:
        r.h2("EAP-IG vs exact activation patching (real model)")
        r.table(["measure", "value"], [[k, v] for k, v in recs.exact.to_dict().items()])
    _attribution_section(r, recs)
    _circuits_section(r, run, cfg, recs)
    _ablations_section(r, run, recs.ablations)
    _svv_section(r, recs)
    _sparsity_section(r, run, recs)
    r.h2("Run log")
    r.pre("\n".join(run.log))
    return r.write(run.path("report.html"))


def _attribution_section(r: Report, recs: StudyRecords) -> None:
    """EAP-IG attribution: one row per vector and setting, with its top nodes."""
    r.h2("Attribution")
    rows = []
    for (n, s), a in recs.attribution.items():
        rows.append([f"{n} {s}", a.n_flipped, len(a.rows_used), _fallback(a), a.scored_positions, a.m_clean,
                     a.m_corrupt, a.s_node, ", ".join(f"{t.graph_node()} {t.score:.2f}" for t in a.top_nodes[:5])])
    r.table(["vector/setting", "flipped", "used", "fallback", "scored pos", "m clean", "m base", "IE(s)", "top nodes"],
            rows)
    fb = sum(row[3] != "no" for row in rows)
    r.p(f"The '< 2 flips: all prompts' fallback fired in {fb} of {len(rows)} attribution sets.", note=True)


def _fallback(a: rc.AttributionRecord) -> str:
    """Which fallback of the flip filter fired for one attribution set ('?' for older records)."""
    if a.fallback_all_prompts is None:
        return "?" if a.n_flipped < 2 else "no"
    return "all prompts (< 2 flipped)" if a.fallback_all_prompts else "no"


def _circuits_section(r: Report, run: Run, cfg: Config, recs: StudyRecords) -> None:
    """Minimal circuits: faithfulness curves, sizes, overlap and controls, and the DIM bypass drawing."""
    r.h2("Circuits (exact edge-level patching)")
    crec = {f"{n}/{s}": c for (n, s), c in recs.circuits.items()}
    if crec:
        r.figure(_faithfulness_fig(crec, cfg.threshold), "faithfulness vs circuit size", run.path("fig_faith.png"))
        r.table(["vector/setting", "minimal edges", "of", "fraction", "reached 0.85", "q/k/v/mlp/logits edges",
                 "held-out faithfulness [95 %] (n)"],
                [[k, c.minimal_edges, c.n_edges_total, c.minimal_fraction, c.reached_threshold,
                  "/".join(str(c.edge_kinds[x]) for x in ("q", "k", "v", "mlp", "logits")), _heldout(c)]
                 for k, c in crec.items()])
        r.p("The circuit is found on the attribution prompts; its held-out faithfulness is measured on the next "
            "n_attr test prompts (same flip filter), with a paired bootstrap interval over those prompts.", note=True)
    for s, cc in recs.compare.items():
        r.h3(f"Circuit overlap and controls ({s})")
        common = cc.overlap_common or {}
        r.table(["pair", "overlap |C1∩C2|/min (own flipped prompts)", "overlap on the common prompt set"],
                [[k, v, common.get(k, "–")] for k, v in cc.overlap.items()])
        r.table(["vector", "own size", "random 2x (two seeds)", "complement", "swapped"],
                [[n, c.own_size, ", ".join(f"{x:.3f}" for x in c.random_2x), c.complement,
                  ", ".join(f"{o}: {v:.3f}" for o, v in c.swapped.items())] for n, c in cc.controls.items()])
    if (dim := recs.circuits.get(("dim", "bypass"))) is not None:
        r.figure(_circuit_fig(run, dim), "minimal DIM bypass circuit", run.path("fig_circuit.png"))


def _heldout(c: rc.CircuitsRecord) -> str:
    h = c.heldout
    if not h or not h.n or h.minimal is None or h.minimal_ci95 is None:
        return "–"
    lo, hi = h.minimal_ci95
    return f"{h.minimal:.3f} [{lo:.2f}, {hi:.2f}] ({h.n})"


def _ablations_section(r: Report, run: Run, arec: dict[str, AblationsRecord]) -> None:
    """Paper A Table 1: ASR per ablation and setting, with Wilson intervals and Holm-corrected McNemar tests."""
    if not arec:
        return
    r.h2("Frozen attention and path ablations (DIM; paper A Table 1)")
    r.figure(_ablation_fig(arec), "ASR per ablation", run.path("fig_ablations.png"))
    hdr = ["ablation"] + [f"{s} ASR [Wilson 95 %] (change, pts; exact McNemar vs steered, Holm)" for s in arec]
    tests = table1_tests(arec)
    body = [["unsteered"] + [_cell(a, "unsteered", tests.get((s, "unsteered"))) for s, a in arec.items()]]
    for m, lab in MODES:
        body.append([lab] + [_cell(a, m, tests.get((s, m))) for s, a in arec.items()])
    r.table(hdr, body)
    r.p("Each cell: ASR over the n prompts of the setting with its Wilson 95 % interval; the change from the "
        "steered run in points; the exact McNemar p-value of the paired per-prompt outcomes against the "
        "steered run, Holm-corrected over every comparison of this table (one family); the discordant pairs "
        "b/c (steered succeeds and ablated fails / the reverse) are the prompts the test rests on.", note=True)
    _judge_table(r, arec)
    _claims_table(r, arec)


def _judge_table(r: Report, arec: dict[str, AblationsRecord]) -> None:
    """Table 1's ASR by the local PatternJudge beside the 12-string matcher, and how often they disagree."""
    outcomes = [(a.each_judge, a.each) for a in arec.values()]
    if not all(j is not None and e is not None for j, e in outcomes):
        return
    rows = []
    for m, lab in (("unsteered", "unsteered"), *MODES):
        row = [lab]
        for judged, matched in outcomes:
            assert judged is not None and matched is not None
            j, s = judged[m], matched[m]
            lo, hi = wilson(sum(j), len(j))
            row.append(f"{sum(j) / len(j):.3f} [{lo:.2f}, {hi:.2f}] (matcher {sum(s) / len(s):.3f}; "
                       f"{sum(x != y for x, y in zip(j, s))} of {len(j)} disagree)")
        rows.append(row)
    r.h3("Table 1 by the PatternJudge (metrics/judge.py) beside the 12-string matcher")
    r.table(["ablation"] + [f"{s} ASR by judge [Wilson 95 %]" for s in arec], rows)


def _svv_section(r: Report, recs: StudyRecords) -> None:
    """Steering value vectors: the logit lens of each vector's top heads."""
    r.h2("Steering value vectors: logit lens of the top heads")
    for n, sv in recs.svv.items():
        r.h3(f"{n}: raw vector top: {' | '.join(sv.raw_vector.top[:8])}")
        r.table(["head", "node IE", "|svv|", "top tokens", "bottom tokens (sign flipped)"],
                [[str(h.graph_node()), h.score, h.norm, " | ".join(h.top.tokens[:8]), " | ".join(h.bottom.tokens[:8])]
                 for h in sv.heads])


def _sparsity_section(r: Report, run: Run, recs: StudyRecords) -> None:
    """Sparsified vectors (bypass): ASR per sparsity and method, and the IoU of the kept dimensions."""
    if recs.sparsity:
        r.h2("Sparsification (bypass)")
    for n, sp in recs.sparsity.items():
        if not sp.asr:
            continue
        r.h3(f"{n}")
        r.figure(_sparsity_fig(sp), f"ASR vs sparsity ({n})", run.path(f"fig_sparsity_{n}.png"))
        r.table(["method"] + [f"{x:.2f}" for x in sp.sparsities],
                [[m] + [f"{v:.3f}" for v in vals] for m, vals in sp.asr.items()],
                caption=f"dense ASR {sp.dense_asr}")
        _paper_rule_table(r, sp)
    if recs.iou is not None:
        _iou_tables(r, recs.iou)


def _paper_rule_table(r: Report, sp: rc.SparsityRecord) -> None:
    """Paper A's gradient rule (r = IE / (alpha s), fixed τ grid): sparsity reached and ASR per τ."""
    pr = sp.paper
    if not pr:
        return
    cells = []
    for j, tau in enumerate(pr.taus):
        asr_j = "–"
        if pr.successes is not None and pr.n is not None:
            k, n = pr.successes[j], pr.n
            lo, hi = wilson(k, n)
            asr_j = f"{k / n:.3f} [{lo:.2f}, {hi:.2f}]"
        cells.append([f"{tau:g}", f"{pr.sparsity[j]:.3f}", asr_j])
    r.table(["τ (paper A grid)", "sparsity reached", f"ASR [Wilson 95 %] (n = {'–' if pr.n is None else pr.n})"],
            cells, caption="paper A's rule: zero dimension i when IE_i / (alpha s_i) = mean gradient < τ; the headline "
            "curves above use the matched-k variant (r = alpha g, τ the quantile for each sparsity)")


def _iou_tables(r: Report, iou: rc.IouRecord) -> None:
    r.h3("IoU of kept dimensions (hypergeometric p-value; expected IoU if independent)")
    for k, v in iou.pairs.items():
        if not v:
            continue
        grid = "τ" if k.startswith("paper:") else "sparsity"
        null = iou.null.get(k, [])
        r.table([grid, "IoU", "hypergeometric p", "expected IoU (uniform)", "random-vector null: mean / 95th pct",
                 "random-vector p"],
                [[f"{a.sparsity:.2f}", f"{a.iou:.3f}", f"{a.p_value:.1e}", f"{a.expected_iou:.3f}",
                  f"{null[j].null_mean:.3f} / {null[j].null_q95:.3f}" if j < len(null) else "–",
                  f"{null[j].p_value:.3f} (n = {null[j].n_null})" if j < len(null) else "–"]
                 for j, a in enumerate(v)], caption=k)


def table1_claims(arec: dict[str, AblationsRecord]) -> list[tuple[str, Claim]]:
    """The mechanism card's frozen rules (:mod:`steerscope.explain.rules`) on Table 1's per-prompt outcomes.

    Per setting: the effect retained by each ablation, (ASR_ablated - ASR_unsteered) / (ASR_steered -
    ASR_unsteered), with a bootstrap 95 % interval over prompts (:func:`steerscope.explain.intervals.ratio`),
    judged by ``frozen.<m>.needed`` and ``frozen.values_not_patterns``: the same three-way decisions as
    the card's, so a sentence of the docs says no more than these claims. Empty for records without
    per-prompt outcomes.

    Example:
        >>> arec = {"bypass": run.load_record("ablations_bypass", AblationsRecord)}
        >>> [(s, c.rule, c.status) for s, c in table1_claims(arec)]
    """
    out: list[tuple[str, Claim]] = []
    for setting, a in arec.items():
        each = a.each
        if not each or "none" not in each or "unsteered" not in each:
            continue
        steer, base = np.asarray(each["none"], float), np.asarray(each["unsteered"], float)
        est = {m: _retained(np.asarray(each[m], float), steer, base)
               for m in ("qk", "ov", "svv", "mlp") if m in each}
        out += [(setting, rules.needed_estimate(e, m)) for m, e in est.items()]
        if "qk" in est and "ov" in est:
            out.append((setting, rules.values_not_patterns_estimates(est["qk"], est["ov"])))
    return out


def _retained(x: np.ndarray, steer: np.ndarray, base: np.ndarray) -> Estimate:
    """Effect retained with the paired bootstrap's interval, computed with two pseudo-prompts added
    (one whose ablation keeps the steering's success, one whose ablation loses it; an Agresti-Coull-
    like "plus two"): on binary outcomes a plain bootstrap of, e.g., 4 of 4 prompts kept has a zero-
    width interval and would decide a claim on 4 prompts. The point estimate is the raw one."""
    on, off = (1.0, 0.0) if steer.mean() >= base.mean() else (0.0, 1.0)  # bypass raises ASR, induce lowers it
    pad = (np.append(x, [on, off]), np.append(steer, [on, on]), np.append(base, [off, off]))
    e = intervals.ratio(*pad)
    return Estimate(intervals.ratio(x, steer, base, n_boot=1).value, e.ci95, len(x))


def _claims_table(r: Report, arec: dict[str, AblationsRecord]) -> None:
    claims = table1_claims(arec)
    if not claims:
        return
    r.h3("The card's verdict rules on Table 1")
    r.table(["setting", "claim", "status", "evidence: effect retained [95 % interval]", "n to decide"],
            [[s, c.statement, c.status, c.evidence, c.n_to_decide or ""] for s, c in claims])
    r.p("Effect retained = (ASR ablated - ASR unsteered) / (ASR steered - ASR unsteered), bootstrap over "
        "prompts; each claim is supported or contradicted only when its interval clears the threshold "
        "(docs/explain.md), else undecided, with the n that would likely decide it.", note=True)

