"""The card as one self-contained HTML page, from its records only (no model code).

Layout: the title names the vector, model, layer and alpha; the claims come first (each with its
status, test and evidence), then the alpha used and why with steered vs unsteered samples, then
one ``<section data-section=...>`` per card key with plots where plots belong (dose with the
chosen alpha marked, attribution shares and frozen effects with 95 % error bars, the faithfulness
curve, the sparsity curves). Jargon is explained once, in a glossary under the claims.
"""

from __future__ import annotations

import html as H
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from steerscope.explain.records import (
    AttributionRecord,
    CircuitRecord,
    Claim,
    DoseRecord,
    Estimate,
    FrozenRecord,
    IdentifiabilityRecord,
    LensRecord,
    SparsityRecord,
    VectorRecord,
)
from steerscope.report.html import Report, plt_figure

if TYPE_CHECKING:
    from steerscope.explain.card import Explanation

GLOSSARY = (
    ("s", "the steering vector at the analysed layer; the model's residual stream gets alpha * s added."),
    ("effect retained", "(m_X - m_unsteered) / (m_steered - m_unsteered) on the steered responses, teacher-forced: "
                        "1 = as steered, 0 = as unsteered."),
    ("metric gap", "per response token, logit(steered greedy token) - logit(unsteered greedy token), summed over "
                   "the tokens where they differ; the effect to explain."),
    ("svv", "steering value vectors: what each head's value projection makes of s itself (its direct read of s)."),
    ("v_perp", "a random direction orthogonal to s with the same norm (identifiability test)."),
    ("[a, b], n", "a 95 % percentile bootstrap interval over the n prompts (clusters of prompts x draws where a "
                  "prompt has several)."),
)
STATUS_COLOUR = {"supported": "#1a7f37", "contradicted": "#b42318", "undecided": "#8a6d00"}


def num(x: float | None) -> str:
    """A number for the page: 3 significant digits, 'n/a' for missing or non-finite."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def est(e: Estimate | None) -> str:
    """``0.58 [0.41, 0.77]`` (the n is stated per table)."""
    return "n/a" if e is None else f"{num(e.value)} [{num(e.ci95[0])}, {num(e.ci95[1])}]"


def token(t: str, tid: int | None = None) -> str:
    """A token as readable text: repr-free, control and unprintable characters shown by id."""
    if t and all(c.isprintable() and c != "\ufffd" for c in t):
        return t.replace(" ", "␣") if t.strip() == "" else t
    return f"<id {tid}>" if tid is not None else "<unprintable>"


def _yerr(ests: Sequence[Estimate]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars [below, above] of each estimate's interval (0 where undefined)."""
    return [[max(0.0, e.value - e.ci95[0]) if e.finite else 0.0 for e in ests],
            [max(0.0, e.ci95[1] - e.value) if e.finite else 0.0 for e in ests]]


def _errbar(ax: Any, labels: Sequence[str], ests: Sequence[Estimate], ref: Sequence[float] = ()) -> None:
    vals = [e.value for e in ests]
    ax.bar(range(len(vals)), vals, yerr=_yerr(ests), capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, fontsize=8)
    for y in ref:
        ax.axhline(y, color="grey", ls="--", lw=1)


def claims(r: Report, cs: Sequence[Claim]) -> None:
    rows = []
    for c in cs:
        colour = STATUS_COLOUR.get(c.status, "#222")
        decide = f" (n ≈ {c.n_to_decide} would likely decide it)" if c.n_to_decide else ""
        rows.append(f'<tr><td class="l"><b style="color:{colour}">{H.escape(c.status)}</b></td>'
                    f'<td class="l">{H.escape(c.statement)}<br/><span class="note">{H.escape(c.rule)}: '
                    f"{H.escape(c.test)}</span></td><td class=\"l\">{H.escape(c.evidence + decide)}</td></tr>")
    r.raw('<table><tr><th class="l">status</th><th class="l">claim and its test</th><th class="l">evidence</th></tr>'
          + "".join(rows) + "</table>")
    r.raw('<table><tr><th class="l">term</th><th class="l">meaning</th></tr>' + "".join(
        f'<tr><td class="l">{H.escape(t)}</td><td class="l">{H.escape(m)}</td></tr>' for t, m in GLOSSARY) + "</table>")


def vector(r: Report, v: VectorRecord) -> None:
    r.p(f"Model {v.model}, site {v.site}, layers {', '.join(map(str, v.layers))} (analysed: {v.analysed_layer}), "
        f"alpha {num(v.alpha)}, {v.n_prompts} prompts; metric gap {est(v.metric_gap)} over {v.scored_positions} "
        "scored positions.")
    r.table(["layer", "|s|", "mean residual norm", "|s| / residual"],
            [[k, num(v.norm[k]), num(v.mean_resid_norm[k]), num(v.relative_norm[k])] for k in v.norm])
    prov = [f"{k} = {val}" for k, val in v.provenance.items() if val not in (None, {}, [], "")]
    r.p("Provenance: " + ("; ".join(prov) if prov else "none recorded") + ".", note=True)


def dose(r: Report, d: DoseRecord) -> None:
    fig = plt_figure(figsize=(8, 3))
    a1, a2 = fig.add_subplot(121), fig.add_subplot(122)
    for ax, ests, colour in ((a1, d.effect, "tab:blue"), (a2, d.kl_quantile, "tab:red")):
        ax.errorbar(d.alphas, [e.value for e in ests], yerr=_yerr(ests), marker="o", capsize=3, color=colour)
        ax.axvline(d.chosen_alpha, color="black", ls=":", lw=1)
        ax.set_xlabel("alpha (dotted: the alpha used)")
    a1.set_ylabel(d.effect_kind.replace("_", " "))
    a2.axhline(d.kl_budget, color="grey", ls="--", lw=1)
    a2.set_ylabel(f"KL, worst {100 * (1 - d.quantile):.0f} % of positions (nats)")
    fig.tight_layout()
    r.figure(fig, "Effect vs alpha (left) and the KL to the unsteered model on neutral prompts (right), "
             "95 % bootstrap intervals over prompts.")
    r.table(["alpha", f"effect [95 %], n = {d.effect[0].n if d.effect else 0}",
             f"KL q{d.quantile:.2f} [95 %], {d.n_neutral_prompts} prompts", "KL mean"],
            [[num(a), est(e), est(k), num(m)] for a, e, k, m in zip(d.alphas, d.effect, d.kl_quantile, d.kl_mean)])
    rng = (f"from {num(d.range[0])} to {num(d.range[1])}" if d.range else
           f"none ({d.range_withheld})" if d.range_withheld else "none")
    r.p(f"Alpha used: {num(d.chosen_alpha)}, {d.chosen_reason}. Recommended range: {rng}.")
    r.table(["alpha", "effect of s", "random direction, same norm", "excess (s - random)"],
            [[num(c.alpha), est(c.effect), est(c.random_effect), est(c.excess)] for c in d.controls])
    r.table(["prompt", f"steered (alpha {num(d.chosen_alpha)})", "unsteered"],
            [[s.prompt, s.steered, s.unsteered] for s in d.samples[:4]])


def lens(r: Report, d: LensRecord) -> None:
    rows = []
    for k in ("raw", "final_norm"):
        ids = d.scores.get(k, {})
        top = [token(t, i) for t, i in zip(d.top_positive[k], ids.get("top_ids", [None] * len(d.top_positive[k])))]
        bot = [token(t, i) for t, i in zip(d.top_negative[k], ids.get("bottom_ids", [None] * len(d.top_negative[k])))]
        rows.append([k.replace("_", " "), " | ".join(top), " | ".join(bot)])
    r.table(["lens", "top positive", "top negative"], rows)


def attribution(r: Report, d: AttributionRecord) -> None:
    fig = plt_figure(figsize=(5, 3))
    ax = fig.add_subplot(111)
    _errbar(ax, list(d.share), list(d.share.values()), ref=(0.2,))
    ax.set_ylabel("share of the steering node's effect")
    r.figure(fig, f"EAP-IG shares by path (T = {d.ig_steps}), 95 % intervals over prompts; dashed: the 0.2 "
             "threshold of the attr.* claims.")
    n = next(iter(d.share.values())).n if d.share else 0
    r.table(["path", f"share [95 %], n = {n}"], [[k, est(v)] for k, v in d.share.items()])
    r.p(f"Steering node IE {num(d.s_node)}; m steered {num(d.m_clean)}, unsteered {num(d.m_corrupt)}; completeness "
        f"(IE / (m steered - m unsteered)) {num(d.completeness)}.")
    r.table(["head", "node IE", "svv norm", "svv lens top", "svv lens bottom"],
            [[h.head, num(h.score), num(h.svv_norm), " | ".join(map(token, h.svv_top[:6])),
              " | ".join(map(token, h.svv_bottom[:6]))] for h in d.top_heads])


def frozen(r: Report, d: FrozenRecord) -> None:
    modes = ("qk", "ov", "svv", "mlp")
    fig = plt_figure(figsize=(5, 3))
    ax = fig.add_subplot(111)
    _errbar(ax, ["QK frozen", "OV frozen", "svv removed", "MLP s removed"],
            [d.path(m).effect_retained for m in modes], ref=(0.5, 0.8))
    ax.set_ylabel("effect retained")
    r.figure(fig, "Effect retained when each path is cut, 95 % intervals over prompts; dashed: 0.5 and 0.8.")
    n = d.qk.effect_retained.n
    r.table(["ablation", f"effect retained [95 %], n = {n}", "tokens reproduced", "tokens retained", "scorer mean"],
            [[m, est(d.path(m).effect_retained), num(d.path(m).tokens_reproduced), num(d.path(m).tokens_retained),
              num(d.path(m).scorer_mean)] for m in modes])
    r.p(f"The unsteered continuation reproduces {num(d.unsteered_tokens_reproduced)} of the steered tokens "
        f"({d.gen_tokens} generated tokens per prompt).", note=True)


def circuit(r: Report, d: CircuitRecord) -> None:
    fig = plt_figure(figsize=(5, 3))
    ax = fig.add_subplot(111)
    ax.plot([n / d.n_edges_total for n in d.n_edges_pruned], d.faithfulness, marker="o")
    ax.axhline(d.threshold, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of edges")
    ax.set_ylabel("faithfulness")
    r.figure(fig, f"Faithfulness of greedy circuits by size (exact edge patching); dashed: {d.threshold:g}.")
    reached = "reaches" if d.reached_threshold else "does not reach"
    r.p(f"Minimal circuit: {d.minimal_edges} of {d.n_edges_total} edges ({100 * d.edge_fraction:.2f} %); it "
        f"{reached} {d.threshold:g}; faithfulness {est(d.faithfulness_minimal)}; complement {num(d.complement)}; "
        f"random circuits of twice its size {', '.join(num(x) for x in d.random_2x)}.")
    r.table(["edges", "faithfulness"], [[n, num(f)] for n, f in zip(d.n_edges_pruned, d.faithfulness)])


def sparsity(r: Report, d: SparsityRecord) -> None:
    fig = plt_figure(figsize=(5, 3))
    ax = fig.add_subplot(111)
    for m, vals in d.effect_retained.items():
        ax.plot(d.kept_fraction, vals, marker="o", label=m)
    ax.axhline(d.target, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of dimensions kept")
    ax.set_ylabel("effect retained")
    ax.legend(fontsize=8)
    r.figure(fig, "Effect retained vs dimensions kept (|IE| rule and baselines).")
    r.p(f"{100 * d.fraction_needed:.1f} % of the dimensions ({d.dims_needed}) keep {d.target:.0%} of the effect; "
        f"95 % interval {100 * d.fraction_ci95[0]:.1f} to {100 * d.fraction_ci95[1]:.1f} % over {d.n} prompts, at a "
        f"resolution of {100 * d.resolution:.1f} % of the dimensions (the spacing of the sizes evaluated).")


def identifiability(r: Report, d: IdentifiabilityRecord) -> None:
    r.table(["vector", f"effect relative to s [95 %], n = {d.n_prompts} prompts x {len(d.seeds)} draws"],
            [["s + v_perp", est(d.v_plus_perp)], ["v_perp alone", est(d.perp_only)]])
    ns = d.null_space
    r.p(f"Equivalence margin ±{d.margin:g}; 90 % interval of s + v_perp {num(d.v_plus_perp_ci90[0])} to "
        f"{num(d.v_plus_perp_ci90[1])}. Null-space fraction {num(d.null_fraction)} (entropy rank: "
        f"{num(ns.get('null_fraction_entropy'))}; {ns.get('n_tokens')} tokens): {d.null_space_note}.")


RENDER_FIRST: dict[str, Callable[[Report, Any], None]] = {"vector": vector, "dose": dose}


def write_card(card: Explanation | dict[str, Any], path: str | Path) -> Path:
    """Render a card (an :class:`~steerscope.explain.card.Explanation`, or its ``card.json`` dict) to ``path``."""
    from steerscope.explain.card import KEYS, Explanation
    from steerscope.explain.sections import SECTIONS

    c = Explanation.from_dict(card) if isinstance(card, dict) else card
    v = c.vector
    r = Report(f"Mechanism card: {v.name or 'vector'} on {v.model}, layer {v.analysed_layer}, alpha {num(v.alpha)}")
    render: dict[str, Callable[[Report, Any], None]] = {**RENDER_FIRST, **{s.name: s.render for s in SECTIONS},
              "claims": claims, "verdict": lambda rep, text: rep.p(text),
              "unsupported": lambda rep, u: rep.table(["section", "reason"], list(u.items())) if u else rep.p("none")}
    for key in ("claims", *(k for k in KEYS if k != "claims")):
        r.raw(f'<section id="{key}" data-section="{key}">')
        r.h2(key)
        val = getattr(c, key)
        if val is None:
            reason = c.unsupported.get(key, "not computed")
            r.raw(f'<p class="unsupported">unsupported: {H.escape(reason)}</p>')
        else:
            render[key](r, val)
        r.raw("</section>")
    return r.write(path)
