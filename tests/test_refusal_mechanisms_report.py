"""Table 1 of the refusal-mechanisms report: paired exact tests, Holm-corrected, against statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from steerscope.studies.refusal_mechanisms.report import _cell, table1_tests


def test_table1_uses_exact_mcnemar_against_the_steered_run_with_holm_over_the_whole_table() -> None:
    rng = np.random.default_rng(3)
    arec = {}
    for setting in ("bypass", "induce"):
        steered = (rng.random(40) < 0.8).astype(int)
        each = {"none": steered.tolist(), "unsteered": [0] * 40}
        for m, flip in (("qk", 0.05), ("ov", 0.5), ("svv", 0.3), ("mlp", 0.1)):
            each[m] = np.where(rng.random(40) < flip, 1 - steered, steered).tolist()
        arec[setting] = {"n": 40, "each": each, **{m: float(np.mean(v)) for m, v in each.items()}}
    got = table1_tests(arec)
    keys = [(s, m) for s in arec for m in ("unsteered", "qk", "ov", "svv", "mlp")]
    raw = []
    for s, m in keys:
        x, y = np.array(arec[s]["each"]["none"]), np.array(arec[s]["each"][m])
        table = [[np.sum((x == 1) & (y == 1)), np.sum((x == 1) & (y == 0))],
                 [np.sum((x == 0) & (y == 1)), np.sum((x == 0) & (y == 0))]]
        raw.append(mcnemar(table, exact=True).pvalue)
    want = multipletests(raw, method="holm")[1]
    assert sorted(got) == sorted(keys)
    for k, w in zip(keys, want):
        assert got[k] == pytest.approx(w)
    assert got[("bypass", "unsteered")] < 0.05  # ~32 discordant pairs, all one way: decided


def test_old_records_without_per_prompt_outcomes_get_no_test() -> None:
    a = {"n": 10, "none": 0.5, "qk": 0.4, "unsteered": 0.1}
    assert table1_tests({"bypass": a}) == {}
    assert _cell(a, "qk", None) == "0.400 [0.17, 0.69] (10.0)"
