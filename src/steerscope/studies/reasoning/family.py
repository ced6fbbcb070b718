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

from steerscope.stats import holm, mcnemar_p
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning.records import EvalRecord, Family, FamilyRow, Findings

_Row = tuple[str, str, float, int, float | None]  # name, test, p, n, effect


def _row(name: str, test: str, p: float, n: int, effect: float | None) -> _Row:
    return name, test, float(p), n, effect


def _vs_base(evals: dict[str, EvalRecord]) -> list[_Row]:
    base, rows = evals["base"], []
    for name, ev in evals.items():
        if name == "base":
            continue
        d = ev.greedy_acc - base.greedy_acc
        rows.append(_row(f"{name} vs base (greedy)", "exact McNemar", mcnemar_p(base.greedy, ev.greedy), ev.n, d))
        sc = an.sampled_comparison(base, ev)
        if sc is not None:
            rows.append(_row(f"{name} vs base (pass@1, k = {ev.k})", "Wilcoxon signed-rank",
                             sc.wilcoxon_p, sc.n, sc.diff[0]))
    return rows


def _extras(res: Findings, n: int) -> list[_Row]:
    """The rows of steps 2-3; ``n`` is the number of test problems (every greedy comparison pairs all of them)."""
    rows = []
    for pr in res.prefix.rows if res.prefix else []:
        c = pr.prefix_vs_vector
        rows.append(_row(f"prefix {pr.token!r} vs L{pr.layer} vector (greedy)", "exact McNemar", c.mcnemar_p,
                         c.n, pr.gain_prefix - pr.gain_vector))
    for r in (res.seeds.rows if res.seeds else [])[1:]:  # row 0 is the study's own vector, counted in _vs_base
        rows.append(_row(f"{r.label} vs base (greedy)", "exact McNemar", r.mcnemar_p, n, r.diff[0]))
    tr = res.transfer
    for side, cmps in ((("on_A", tr.on_A), ("on_B", tr.on_B)) if tr else ()):
        for key, cmp in cmps.items():
            if (side, key) != ("on_A", "own_vs_base"):  # = the study's vector vs base
                rows.append(_row(f"transfer {side} {key} (greedy)", "exact McNemar", cmp.mcnemar_p, n, cmp.diff[0]))
    if res.gate is not None:
        for key, g in (("vs_plain", res.gate.vs_plain), ("vs_base", res.gate.vs_base)):
            rows.append(_row(f"gated vector {key} (greedy)", "exact McNemar", g.mcnemar_p, n, g.diff[0]))
    return rows


def family(evals: dict[str, EvalRecord], res: Findings, alpha: float = 0.05) -> Family:
    """All paired comparisons of a run with raw and Holm-adjusted p-values and a verdict each.

    Each row has ``name``, ``test``, ``p``, ``n`` (the problems the comparison pairs), ``p_holm``, ``effect``
    (the difference in accuracy, second minus first) and ``verdict`` ("difference" when p_holm < alpha, else
    "no significant difference").

    Example:
        >>> family(evals, Findings()).m  # one greedy (and one pass@1) comparison per condition but base
    """
    n = evals["base"].n if "base" in evals else next((e.n for e in evals.values()), 0)
    rows = (_vs_base(evals) if "base" in evals else []) + _extras(res, n)
    adj = holm([r[2] for r in rows]) if rows else []
    return Family(alpha, len(rows), [FamilyRow(*r, q, "difference" if q < alpha else "no significant difference")
                                     for r, q in zip(rows, adj)])
