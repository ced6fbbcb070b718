"""Table 1 of the refusal-mechanisms report: paired exact tests, Holm-corrected, against statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from steerscope.studies.refusal_mechanisms.records import ABLATION_MODES, AblationsRecord
from steerscope.studies.refusal_mechanisms.report import _cell, table1_tests


def _abl(d: dict) -> AblationsRecord:
    """An ablations record from the JSON of a (possibly older, partial) record; absent columns read 0."""
    return AblationsRecord.from_dict({"setting": "bypass", "alpha": -1.0, **{m: 0.0 for m in ABLATION_MODES}, **d})


def test_table1_uses_exact_mcnemar_against_the_steered_run_with_holm_over_the_whole_table() -> None:
    rng = np.random.default_rng(3)
    arec = {}
    for setting in ("bypass", "induce"):
        steered = (rng.random(40) < 0.8).astype(int)
        each = {"none": steered.tolist(), "unsteered": [0] * 40}
        for m, flip in (("qk", 0.05), ("ov", 0.5), ("svv", 0.3), ("mlp", 0.1)):
            each[m] = np.where(rng.random(40) < flip, 1 - steered, steered).tolist()
        arec[setting] = _abl({"n": 40, "each": each, **{m: float(np.mean(v)) for m, v in each.items()}})
    got = table1_tests(arec)
    keys = [(s, m) for s in arec for m in ("unsteered", "qk", "ov", "svv", "mlp")]
    raw = []
    for s, m in keys:
        x, y = np.array(arec[s].each["none"]), np.array(arec[s].each[m])
        table = [[np.sum((x == 1) & (y == 1)), np.sum((x == 1) & (y == 0))],
                 [np.sum((x == 0) & (y == 1)), np.sum((x == 0) & (y == 0))]]
        raw.append(mcnemar(table, exact=True).pvalue)
    want = multipletests(raw, method="holm")[1]
    assert sorted(got) == sorted(keys)
    for k, w in zip(keys, want):
        assert got[k] == pytest.approx(w)
    assert got[("bypass", "unsteered")] < 0.05  # ~32 discordant pairs, all one way: decided


def test_old_records_without_per_prompt_outcomes_get_no_test() -> None:
    a = _abl({"n": 10, "none": 0.5, "qk": 0.4, "unsteered": 0.1})
    assert table1_tests({"bypass": a}) == {}
    assert _cell(a, "qk", None) == "0.400 [0.17, 0.69] (10.0)"


def _table1(n: int, qk_keep: float, ov_keep: float, seed: int = 0) -> dict:
    """Per-prompt ASR outcomes: the steered run succeeds on every prompt, the unsteered on none; an
    ablation keeps each prompt's success with probability ``keep``."""
    rng = np.random.default_rng(seed)
    each = {"none": [1] * n, "unsteered": [0] * n}
    for m, keep in (("qk", qk_keep), ("ov", ov_keep), ("svv", ov_keep), ("mlp", 1.0)):
        each[m] = (rng.random(n) < keep).astype(int).tolist()
    return {"n": n, "each": each, **{m: float(np.mean(v)) for m, v in each.items()}}


@pytest.mark.parametrize("n, qk, ov, status", [(64, 1.0, 0.05, "supported"), (64, 0.2, 0.05, "contradicted"),
                                               (4, 1.0, 0.0, "undecided")])
def test_table1_claims_apply_the_cards_frozen_rules_to_per_prompt_outcomes(n, qk, ov, status) -> None:
    from steerscope.studies.refusal_mechanisms.report import table1_claims

    claims = dict((c.rule, c) for _s, c in table1_claims({"bypass": _abl(_table1(n, qk, ov))}))
    assert claims["frozen.values_not_patterns"].status == status
    assert claims["frozen.mlp.needed"].status in ("contradicted", "undecided")  # MLP ablation keeps everything
    assert claims["frozen.ov.needed"].n == n
    assert table1_claims({"bypass": _abl({"n": 3, "none": 0.5, "qk": 0.4, "unsteered": 0.1})}) == []
    induce = _table1(n, qk, ov)  # the same, with ASR falling under steering (outcomes flipped)
    induce["each"] = {m: [1 - v for v in e] for m, e in induce["each"].items()}
    claims = dict((c.rule, c) for _s, c in table1_claims({"induce": _abl(induce)}))
    assert claims["frozen.values_not_patterns"].status == status


def test_table1_cells_give_the_discordant_pairs_each_test_rests_on() -> None:
    from steerscope.studies.refusal_mechanisms.report import discordant

    a = _abl({"n": 6, "none": 4 / 6, "qk": 3 / 6,
              "each": {"none": [1, 1, 1, 1, 0, 0], "qk": [1, 0, 0, 1, 1, 0]}})
    assert discordant(a, "qk") == (2, 1)
    assert _cell(a, "qk", 0.5).endswith("(16.7; p = 0.5; 2/1 discordant of 6)")
    assert discordant(_abl({"n": 6, "none": 0.5, "qk": 0.5}), "qk") is None


def test_flip_filter_records_when_the_all_prompts_fallback_fires() -> None:
    import torch

    from steerscope.studies.refusal_mechanisms.steps import flip_rows

    mask = torch.tensor([[True], [True], [False], [True]])
    rows, info = flip_rows(["I cannot."] * 4, ["Sure.", "Sure.", "Sure.", "I cannot."], mask)
    assert rows == [0, 1] and info.to_dict() == {"n_flipped": 3, "fallback_all_prompts": False,
                                                 "fallback_no_scored": False}
    rows, info = flip_rows(["I cannot."] * 4, ["Sure.", "I cannot.", "I cannot.", "I cannot."], mask)
    assert rows == [0, 1, 3] and info.fallback_all_prompts and info.n_flipped == 1
    rows, info = flip_rows(["a", "b"], ["I cannot.", "I cannot."], torch.zeros(2, 1, dtype=torch.bool))
    assert rows == [0, 1] and info.fallback_no_scored
