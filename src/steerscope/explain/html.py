"""The card as one self-contained HTML page: one ``<section data-section=...>`` per card key,
filled from ``card.json`` only (no model code), with the dose and sparsity plots inline."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

from steerscope.report.html import Report, plt_figure


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _vector(r: Report, v: dict[str, Any]) -> None:
    r.p(f"Model {v['model']}, site {v['site']}, layers {v['layers']} (analysed: {v['analysed_layer']}), "
        f"alpha {_f(v['alpha'])}, {v['n_prompts']} prompts; metric gap {_f(v.get('metric_gap'))} over "
        f"{v.get('scored_positions')} scored positions.")
    r.table(["layer", "norm", "mean residual norm", "relative"],
            [[k, v["norm"][k], v["mean_resid_norm"][k], v["relative_norm"][k]] for k in v["norm"]])
    r.p("Provenance: " + ", ".join(f"{k}={val}" for k, val in v["provenance"].items() if val not in (None, {}, [])),
        note=True)


def _dose(r: Report, d: dict[str, Any]) -> None:
    fig = plt_figure(figsize=(8, 3))
    a1, a2 = fig.add_subplot(121), fig.add_subplot(122)
    a1.plot(d["alphas"], [e if e is not None else float("nan") for e in d["effect"]], marker="o")
    a1.set_xlabel("alpha")
    a1.set_ylabel(d["effect_kind"])
    a2.plot(d["alphas"], d["kl_quantile"], marker="o", color="tab:red")
    a2.axhline(d["kl_budget"], color="grey", ls="--", lw=1)
    a2.set_xlabel("alpha")
    a2.set_ylabel(f"KL q{d['quantile']:.2f} (nats)")
    fig.tight_layout()
    r.figure(fig, "Effect vs alpha (left) and the KL to the unsteered model on neutral prompts (right).")
    r.table(["alpha", "effect", "KL quantile", "KL mean"],
            [[_f(a), _f(e), _f(k), _f(m)] for a, e, k, m in zip(d["alphas"], d["effect"], d["kl_quantile"],
                                                                 d["kl_mean"])])
    r.p(f"Recommended range: {d['range']}; chosen alpha {_f(d['chosen_alpha'])}.")


def _lens(r: Report, d: dict[str, Any]) -> None:
    rows = [[k, " | ".join(d["top_positive"][k]), " | ".join(d["top_negative"][k])] for k in ("raw", "final_norm")]
    r.table(["lens", "top positive", "top negative"], rows)


def _attribution(r: Report, d: dict[str, Any]) -> None:
    r.table(["path", "share"], [[k, _f(v)] for k, v in d["share"].items()])
    r.table(["head", "node IE", "svv norm", "svv lens top", "svv lens bottom"],
            [[h["head"], _f(h["score"]), _f(h["svv_norm"]), " | ".join(h["svv_top"][:6]),
              " | ".join(h["svv_bottom"][:6])] for h in d["top_heads"]])


def _frozen(r: Report, d: dict[str, Any]) -> None:
    r.table(["ablation", "effect retained", "tokens reproduced", "tokens retained", "scorer mean"],
            [[m, _f(d[m]["effect_retained"]), _f(d[m]["tokens_reproduced"]), _f(d[m]["tokens_retained"]),
              _f(d[m]["scorer_mean"])] for m in ("qk", "ov", "svv", "mlp")])


def _circuit(r: Report, d: dict[str, Any]) -> None:
    r.p(f"Minimal faithful circuit: {d['minimal_edges']} of {d['n_edges_total']} edges "
        f"({100 * d['edge_fraction']:.2f} %), reached {d['reached_threshold']}; complement "
        f"{_f(d['controls']['complement'])}, 2x random {[_f(x) for x in d['controls']['random_2x']]}.")
    r.table(["top-n", "edges", "faithfulness"], list(zip(d["sizes"], d["n_edges_pruned"],
                                                          [_f(x) for x in d["faithfulness"]])))


def _sparsity(r: Report, d: dict[str, Any]) -> None:
    fig = plt_figure(figsize=(5, 3))
    ax = fig.add_subplot(111)
    for m, vals in d["effect_retained"].items():
        ax.plot(d["kept_fraction"], [v if v is not None else float("nan") for v in vals], marker="o", label=m)
    ax.axhline(d["target"], color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of dimensions kept")
    ax.set_ylabel("effect retained")
    ax.legend(fontsize=8)
    r.figure(fig, "Effect retained vs dimensions kept (|IE| rule and baselines).")
    r.p(f"{100 * d['fraction_needed']:.1f} % of the dimensions ({d['dims_needed']}) keep {d['target']:.0%} "
        "of the effect.")


def _identifiability(r: Report, d: dict[str, Any]) -> None:
    r.table(["vector", "effect relative to s", "95 % CI"],
            [[k, _f(d[k]["effect_relative"]), str([_f(x) for x in d[k]["ci95"]])] for k in ("v_plus_perp", "perp_only")])
    ns = d["null_space"]
    r.p(f"Null-space fraction (covariance, 0.05 sigma_max): {_f(d['null_fraction'])}; entropy rank: "
        f"{_f(ns['null_fraction_entropy'])}; {ns['n_tokens']} tokens.")


RENDER: dict[str, Callable[[Report, Any], None]] = {
    "vector": _vector, "dose": _dose, "lens": _lens, "attribution": _attribution, "frozen": _frozen,
    "circuit": _circuit, "sparsity": _sparsity, "identifiability": _identifiability,
    "verdict": lambda r, v: r.p(v),
    "unsupported": lambda r, u: r.table(["section", "reason"], list(u.items())) if u else r.p("none"),
}


def write_card(card: dict[str, Any], path: str | Path) -> Path:
    """Render a card dict (``Explanation.to_dict()``) to ``path``."""
    r = Report(f"Mechanism card: {card['vector'].get('model')} layer {card['vector'].get('analysed_layer')}")
    for key, fn in RENDER.items():
        r.raw(f'<section id="{key}" data-section="{key}">')
        r.h2(key)
        val = card.get(key)
        if val is None:
            reason = (card.get("unsupported") or {}).get(key, "not computed")
            r.raw(f'<p class="unsupported">unsupported: {html.escape(reason)}</p>')
        else:
            fn(r, val)
        r.raw("</section>")
    return r.write(path)
