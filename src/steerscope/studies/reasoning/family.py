"""One family of tests per run, Holm-corrected (issue 25): every paired comparison the study makes.

1. Each condition against the unsteered model: greedy outcomes by the exact McNemar test
   (:func:`steerscope.stats.mcnemar_p`); pass@1 over k samples per problem by the Wilcoxon signed-rank
   test of the per-problem mean differences (:func:`analyses.sampled_comparison`).
2. Each prefix control against the vector whose lens token it writes (exact McNemar).
3. The extra training seeds, the transfer directions and the gated vector (exact McNemar each; the
   comparisons that repeat one of 1. are not counted twice).
4. Holm-Bonferroni over all of them (:func:`steerscope.stats.holm`); a comparison is called a difference
   when its Holm-adjusted p < ``alpha``. Normal-approximation intervals stay in the report as descriptive
   figures only.
"""

from __future__ import annotations

from typing import Any

from steerscope.stats import holm, mcnemar_p
from steerscope.studies.reasoning import analyses as an


def _row(name: str, test: str, p: float, n: int, effect: float | None) -> dict[str, Any]:
    return {"name": name, "test": test, "p": float(p), "n": n, "effect": effect}


def _vs_base(evals: dict[str, Any]) -> list[dict[str, Any]]:
    base, rows = evals["base"], []
    for name, ev in evals.items():
        if name == "base":
            continue
        d = ev["greedy_acc"] - base["greedy_acc"]
        rows.append(_row(f"{name} vs base (greedy)", "exact McNemar", mcnemar_p(base["greedy"], ev["greedy"]), ev["n"], d))
        sc = an.sampled_comparison(base, ev)
        if sc is not None:
            rows.append(_row(f"{name} vs base (pass@1, k = {ev.get('k', '?')})", "Wilcoxon signed-rank",
                             sc["wilcoxon_p"], sc["n"], sc["diff"][0]))
    return rows


def _extras(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for pr in (res.get("prefix") or {}).get("rows", []):
        c = pr["prefix_vs_vector"]
        rows.append(_row(f"prefix {pr['token']!r} vs L{pr['layer']} vector (greedy)", "exact McNemar", c["mcnemar_p"],
                         c["n"], pr["gain_prefix"] - pr["gain_vector"]))
    for r in (res.get("seeds") or {}).get("rows", [])[1:]:  # row 0 is the study's own vector, counted in _vs_base
        rows.append(_row(f"{r['label']} vs base (greedy)", "exact McNemar", r["mcnemar_p"], r["gained"] + r["lost"],
                         r["diff"][0]))
    tr = res.get("transfer") or {}
    for side in ("on_A", "on_B"):
        for key, c in (tr.get(side) or {}).items():
            if (side, key) != ("on_A", "own_vs_base"):  # = the study's vector vs base
                rows.append(_row(f"transfer {side} {key} (greedy)", "exact McNemar", c["mcnemar_p"], 0, c["diff"][0]))
    g = res.get("gate") or {}
    for key in ("vs_plain", "vs_base"):
        if key in g:
            rows.append(_row(f"gated vector {key} (greedy)", "exact McNemar", g[key]["mcnemar_p"], 0, g[key]["diff"][0]))
    return rows


def family(evals: dict[str, Any], res: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """All paired comparisons of a run with raw and Holm-adjusted p-values and a verdict each.

    Returns ``{"alpha", "m", "rows"}``; each row has ``name``, ``test``, ``p``, ``p_holm``, ``effect``
    (the difference in accuracy, second minus first) and ``verdict`` ("difference" when p_holm < alpha,
    else "no significant difference").
    """
    rows = _vs_base(evals) + _extras(res) if "base" in evals else _extras(res)
    adj = holm([r["p"] for r in rows]) if rows else []
    for r, q in zip(rows, adj):
        r["p_holm"] = q
        r["verdict"] = "difference" if q < alpha else "no significant difference"
    return {"alpha": alpha, "m": len(rows), "rows": rows}
