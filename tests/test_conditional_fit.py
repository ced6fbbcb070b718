"""Fitting a condition: seeded splits, the validation choice, and the test figure checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.conditional import Condition
from steerscope.conditional.fit import (
    LOGISTIC_STEPS,
    _train_logistic,
    balanced_accuracy,
    best_threshold,
    sklearn_l2,
    split,
    threshold_at_fpr,
)
from steerscope.errors import DataError
from steerscope.stats import fit_logistic

WORDS = ["apple", "river", "music", "stone", "cloud", "green", "paper", "light", "horse", "glass", "money", "bread"]
POS = [f"zebra zebra zebra {w} zebra" for w in WORDS]
NEG = [f"{w} table lamp chair" for w in WORDS]


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    return make_tiny("llama", seed=4, tokenizer=smol_tokenizer)


def test_split_is_seeded_disjoint_and_sized_by_the_fractions():
    a = split(12, (0.5, 0.25, 0.25), 0)
    assert [len(s) for s in a] == [6, 3, 3]
    assert sorted(np.concatenate(a).tolist()) == list(range(12))
    assert all((x == y).all() for x, y in zip(a, split(12, (0.5, 0.25, 0.25), 0)))
    assert [len(s) for s in split(4, (0.5, 0.25, 0.25), 1)] == [2, 1, 1]


def test_best_threshold_maximises_balanced_accuracy_by_brute_force():
    g = np.random.default_rng(0)
    pos, neg = g.normal(1, 1, 9), g.normal(0, 1, 5)
    t, ba = best_threshold(pos, neg)
    grid = np.linspace(-5, 5, 20001)
    assert ba == pytest.approx(max(balanced_accuracy(pos, neg, x) for x in grid))
    assert balanced_accuracy(pos, neg, t) == ba


@pytest.mark.parametrize("max_fpr", [0.0, 0.1, 0.25, 0.5])
def test_threshold_at_fpr_opens_on_the_most_positives_within_the_false_positive_budget(max_fpr):
    g = np.random.default_rng(1)
    pos, neg = g.normal(1, 1, 40), g.normal(0, 1, 20)
    t, tpr = threshold_at_fpr(pos, neg, max_fpr)
    assert np.mean(neg > t) <= max_fpr and tpr == np.mean(pos > t)
    grid = np.linspace(-6, 6, 24001)  # brute force: no threshold within the budget opens on more positives
    assert tpr == max(np.mean(pos > x) for x in grid if np.mean(neg > x) <= max_fpr)
    assert threshold_at_fpr(np.array([2.0, 3.0]), np.array([0.0, 1.0, 2.5]), 0.34) == (1.5, 1.0)


def test_a_fit_for_a_false_positive_budget_chooses_by_the_true_positive_rate_there(tiny):
    cond = Condition.fit(tiny, POS, NEG, layers=[0, 1, 2], reduce="last", seed=3, max_fpr=0.0)
    r = cond.report
    assert r is not None and r.metric == "tpr_at_fpr" and r.max_fpr == 0.0
    assert r.val_by_layer[r.layer] == max(r.val_by_layer.values())
    assert json.loads(json.dumps(r.to_dict()))["max_fpr"] == 0.0
    with pytest.raises(DataError, match="max_fpr"):
        Condition.fit(tiny, POS, NEG, layers=[0], max_fpr=1.5)


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_fit_logistic_at_sklearn_l2_is_scikit_learns_l2_logistic_regression(C):
    sk = pytest.importorskip("sklearn.linear_model")
    g = np.random.default_rng(2)
    x = g.normal(size=(80, 6))
    y = (x @ np.array([1.0, -2.0, 0.5, 0, 0, 0]) + g.normal(size=80) > 0.3).astype(int)
    w, b = fit_logistic(x, y, sklearn_l2(C, len(x)), steps=LOGISTIC_STEPS)
    ref = sk.LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-4, atol=1e-4)  # both solvers stop at a tolerance
    assert b == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-4)


def test_the_logistic_probe_scores_as_scikit_learn_decides_on_standardised_features():
    sk = pytest.importorskip("sklearn.linear_model")
    g = np.random.default_rng(3)
    f = torch.as_tensor(g.normal(size=(60, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, 0, -2, 1], dtype=torch.float32)
    y = (f[:, 0] + 0.3 * f[:, 1] + torch.as_tensor(g.normal(size=60), dtype=torch.float32) > 1.5).numpy().astype(int)
    u, c, s = _train_logistic(f, y, C=0.1)
    x = f.double().numpy()
    dec = sk.LogisticRegression(C=0.1, tol=1e-10, max_iter=10000).fit((x - x.mean(0)) / x.std(0), y)
    ref = dec.decision_function((x - x.mean(0)) / x.std(0))
    ours = (((f - c) @ u) / s).double().numpy()
    ratio = ours / ref
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-5) and s > 0
    assert (ratio > 0).all() and ratio.std() / ratio.mean() < 1e-3  # the same boundary, a positive rescaling


@pytest.mark.parametrize("reduce, probe", [("mean", "dim"), ("last", "dim"), ("max", "dim"),
                                           ("last", "logistic"), ("max", "logistic")])
def test_fitted_condition_reports_figures_that_a_hand_computation_reproduces(tiny, reduce, probe):
    cond = Condition.fit(tiny, POS, NEG, layers=[0, 1, 2], reduce=reduce, seed=3, probe=probe)
    r = cond.report
    assert r is not None and r.layer == cond.layer and r.threshold == cond.threshold and r.reduce == reduce
    assert r.probe == probe and (r.C is None) == (probe == "dim") and (r.C in (None, 0.001, 0.01, 0.1, 1.0))
    assert (r.n_train, r.n_val, r.n_test, r.n) == ((6, 6), (3, 3), (3, 3), 6)
    assert set(r.val_by_layer) <= {0, 1, 2} and r.val_balanced_accuracy == max(r.val_by_layer.values())
    assert r.test_ci95[0] <= r.test_balanced_accuracy <= r.test_ci95[1]
    json.dumps(r.to_dict())
    # the test figure by hand: the same split, hidden_states[layer], this condition's own normalisation
    test_idx = split(12, r.fractions, 3)[2], split(12, r.fractions, 4)[2]
    decided = []
    for prompts, idx in ((POS, test_idx[0]), (NEG, test_idx[1])):
        for i in idx:
            enc = tiny.tokenize([tiny.format_chat(prompts[i])])
            with torch.no_grad():
                h = tiny.model(**enc, output_hidden_states=True).hidden_states[cond.layer][0].float()
            p = ((h - cond.center) @ cond.unit) / cond.scale
            decided.append(float({"mean": p.mean(), "max": p.max(), "last": p[-1]}[reduce]) > cond.threshold)
    tpr, tnr = np.mean(decided[:3]), 1 - np.mean(decided[3:])
    assert r.test_balanced_accuracy == pytest.approx((tpr + tnr) / 2)
    assert (r.test_tpr, r.test_tnr) == (pytest.approx(tpr), pytest.approx(tnr))
    assert r.test_balanced_accuracy > 0.8  # the classes differ in their tokens: a probe finds it


def test_the_fitted_gate_opens_in_the_forward_exactly_where_the_fit_says(tiny):
    cond = Condition.fit(tiny, POS, NEG, layers=[1, 2], seed=0)
    prompts = POS[:3] + NEG[:3]
    enc = tiny.tokenize([tiny.format_chat(p) for p in prompts])
    with torch.no_grad():
        hs = tiny.model(**enc, output_hidden_states=True).hidden_states[cond.layer].float()
    m = enc["attention_mask"].bool()
    hand = [float((((hs[b][m[b]] - cond.center) @ cond.unit) / cond.scale).mean()) > cond.threshold for b in range(6)]
    vec = ss.SteeringVector({cond.layer: 5 * torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))})
    with ss.steering(tiny, vec, 2.0, condition=cond), torch.no_grad():
        gated = tiny.model(**enc).logits
    with ss.steering(tiny, vec, [2.0 * h for h in hand]), torch.no_grad():
        ref = tiny.model(**enc).logits
    assert torch.equal(gated, ref)
    assert any(hand) and not all(hand)


def test_fit_is_deterministic_for_a_seed(tiny):
    a = Condition.fit(tiny, POS, NEG, layers=[1, 2], seed=5)
    b = Condition.fit(tiny, POS, NEG, layers=[1, 2], seed=5)
    assert a.report == b.report and torch.equal(a.direction, b.direction)


@pytest.mark.parametrize("kw, match", [
    (dict(positive=POS[:3], negative=NEG), "at least 4"),
    (dict(positive=POS, negative=NEG, layers=[9]), "layers"),
    (dict(positive=POS, negative=NEG, fractions=(0.5, 0.5, 0.0)), "fractions"),
    (dict(positive="one prompt", negative=NEG), "lists"),
    (dict(positive=POS, negative=NEG, probe="svm"), "probe must be one of dim, logistic"),
    (dict(positive=POS, negative=NEG, probe="logistic", Cs=(0.0,)), "Cs"),
    (dict(positive=[POS[0]] * 8, negative=[POS[0]] * 8), "identical mean activations"),
    (dict(positive=[POS[0]] * 8, negative=[POS[0]] * 8, probe="logistic"), "logistic probe found no direction"),
])
def test_bad_fit_inputs_raise_one_line_errors(tiny, kw, match):
    with pytest.raises(DataError, match=match):
        Condition.fit(tiny, **kw)
