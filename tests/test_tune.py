"""``tune`` (issue 23, part 1): the split, the objective against direct computations, the search
against the exhaustive grid, the result record, the run folder and the written vector; tiny models."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import steerscope as ss
from steerscope._files import dumps
from steerscope.errors import DataError, RecommendedAlpha, SteerscopeError
from steerscope.explain.dose import kl_per_position
from steerscope.tune import Settings, TuneResult, search, tune
from steerscope.tune import objective as O
from steerscope.tune.data import Pair, pairs_of, split
from steerscope.tune.records import Trial
from test_refusal_mechanisms_fixtures import one_thread, smol_tokenizer, tiny_lm, tiny_vector  # noqa: F401

POS = ["Write a formal letter to the bank.", "Compose an official memo on budgets.", "Draft a formal notice.",
       "Prepare a formal report.", "Write a polite formal request.", "Issue an official statement.",
       "Write a formal apology.", "Draft a formal invitation."]
NEG = ["yo write the bank something", "jot a chill note on budgets", "shoot a quick text", "scribble some notes lol",
       "ask em real casual", "just say whatever dude", "say sorry quick", "text em to come hang"]
TINY = Settings(n_alphas=3, n_neutral=4, kl_tokens=3, n_boot=200, rungs=2, scales=(0.1, 2.0))


def test_split_sizes_are_stated_disjoint_and_seeded():
    a = split(12, 8, seed=0, fractions=(0.5, 0.25, 0.25), shared_prompt=False)
    assert a.sizes() == {"train": 6, "validation": 3, "test": 3, "neutral_validation": 4, "neutral_test": 4,
                         "dropped": 0}
    assert sorted(a.train + a.validation + a.test) == list(range(12))
    assert sorted(a.neutral_validation + a.neutral_test) == list(range(8))
    assert split(12, 8, seed=0, fractions=(0.5, 0.25, 0.25), shared_prompt=False) == a
    assert split(12, 8, seed=1, fractions=(0.5, 0.25, 0.25), shared_prompt=False).validation != a.validation
    assert split(6, 8, seed=0, fractions=(0.5, 0.25, 0.25), shared_prompt=False).sizes()["test"] == 2  # floor of 2
    with pytest.raises(DataError, match="at least 6 contrast pairs"):
        split(5, 8, seed=0, fractions=(0.5, 0.25, 0.25), shared_prompt=False)


def test_pairs_share_a_prompt_only_when_both_sides_have_the_same_one():
    with pytest.warns(UserWarning, match="1 unpaired"):
        pairs, dropped = pairs_of([("Q?", "Yes."), "plain", ("A", "x")], [("Q?", "No."), "other"])
    assert dropped == 1 and pairs == [Pair("Q?", "Yes.", "No."), Pair(None, "plain", "other")]
    assert pairs_of([("A", "x")], [("B", "y")])[0] == [Pair(None, "A\n\nx", "B\n\ny")]


def test_two_call_teacher_forcing_equals_one_forward_for_every_scope(one_thread):
    """log p(y | c) with the prompt call + continuation call equals a single forward over c + y steered at
    the columns the scope names (prompt: c's, generated: y's), for a batch of padded rows."""
    lm = tiny_lm()
    vec = tiny_vector(lm, layer=1, scale=4.0)
    rows = O.rows(lm, [Pair("How are you?", "Fine, thanks.", "Go away."), Pair(None, "A formal letter.", "yo")])
    for scope in ("all", "prompt", "generated"):
        with ss.steering(lm, vec, 2.0, scope):
            batched = O.logprob(O.forward(lm, rows))
        for j, (c, y) in enumerate(rows):
            cols = {"all": "all", "prompt": list(range(len(c))), "generated": list(range(len(c), len(c) + len(y)))}
            with torch.no_grad(), ss.steering(lm, vec, 2.0, cols[scope]):
                lp = lm.model(torch.tensor([c + y])).logits.float().log_softmax(-1)
            direct = lp[0, len(c) - 1:-1].gather(-1, torch.tensor(y)[:, None]).sum()
            assert float(batched[j]) == pytest.approx(float(direct), abs=1e-3), (scope, j)


def test_objective_and_penalty_match_a_direct_computation(one_thread):
    assert O.penalized(2.0, 1.5, 1.0, 10.0) == (-3.0, 5.0) and O.penalized(2.0, 0.5, 1.0, 10.0) == (2.0, 0.0)
    lm = tiny_lm()
    vec = ss.SteeringVector({1: tiny_vector(lm, 1)[1], 2: tiny_vector(lm, 2, seed=2)[2]})
    pairs = [Pair(None, p, n) for p, n in zip(POS[:3], NEG[:3])]
    prompts = ["Tell me about your weekend.", "Describe the city you live in."]
    ev = O.Evaluator(lm, vec, pairs, prompts, None, TINY)
    alpha = 1.5
    # effect: steered minus unsteered log-odds, each from one plain forward over lead-in + text
    lead = O.lead_in(lm)

    def logodds(steer: bool) -> np.ndarray:
        out = []
        for p in pairs:
            lps = []
            for text in (p.positive, p.negative):
                y = O._ids(lm, text)
                with torch.no_grad(), (ss.steering(lm, ss.SteeringVector({2: vec[2]}), alpha) if steer else
                                       torch.no_grad()):
                    lp = lm.model(torch.tensor([lead + y])).logits.float().log_softmax(-1)
                lps.append(float(lp[0, len(lead) - 1:-1].gather(-1, torch.tensor(y)[:, None]).sum()))
            out.append(lps[0] - lps[1])
        return np.array(out)
    np.testing.assert_allclose(ev.effect(2, alpha, "all", [0, 1, 2]), logodds(True) - logodds(False), atol=2e-3)
    # KL: every position of each neutral prompt and of its unsteered greedy continuation, pooled, 95 % quantile
    kls = []
    for c, y in ev.neutral:
        ids = torch.tensor([c + y])
        with torch.no_grad():
            base = lm.model(ids).logits
            with ss.steering(lm, ss.SteeringVector({2: vec[2]}), alpha):
                steered = lm.model(ids).logits
        kls.append(kl_per_position(base, steered, torch.ones_like(ids)).numpy())
    direct = float(np.quantile(np.concatenate(kls), 0.95))
    assert float(np.quantile(np.concatenate(ev.kl(2, alpha, "all")), 0.95)) == pytest.approx(direct, abs=1e-4)


def _surface(layers, seed):
    """A synthetic validation surface, smooth over layers, its optimum at the edge of the KL budget."""
    r = np.random.default_rng(seed)
    centre, width, bonus = r.uniform(layers[0], layers[-1]), r.uniform(2, 6), r.uniform(-0.3, 0.3)
    base, slope, pf = math.exp(r.uniform(math.log(0.3), math.log(2))), r.uniform(-0.15, 0.15), r.uniform(1, 2)

    def evaluate(cfg, number):
        gain = math.exp(-((cfg.layer - centre) / width) ** 2) + (bonus if cfg.positions == "all" else 0.0)
        amax = base * math.exp(slope * (cfg.layer - layers[len(layers) // 2])) * (pf if cfg.positions == "prompt" else 1)
        effect, kl = gain * 4 * cfg.scale / (1 + cfg.scale) - 0.3 * cfg.scale ** 2, (cfg.scale / amax) ** 2
        for k in (1, 2, 3):  # the running mean over three chunks of pairs wobbles before the last
            e = effect * (1 + (0.1 * math.sin(7 * k + cfg.layer + cfg.scale) if k < 3 else 0))
            obj, pen = O.penalized(e, kl, 1.0, 10.0)
            yield Trial(number, cfg.layer, cfg.positions, cfg.scale, cfg.scale, e, kl, pen, obj,
                        "complete" if k == 3 else "partial", k / 3)
    return evaluate


def test_search_reaches_95_percent_of_the_grid_with_a_quarter_of_its_evaluations():
    st = Settings(n_alphas=8, scales=(0.0625, 4.0), rungs=3)
    layers = list(range(2, 12))
    ratios = []
    for seed in range(8):
        evaluate = _surface(layers, seed)
        grid = search.exhaustive(evaluate, layers, ["all", "prompt"], st)
        assert grid.evaluations == grid.grid_size == 160 and grid.cost == 160
        found = search.tpe(evaluate, layers, ["all", "prompt"], st, budget=grid.grid_size // 4, seed=seed)
        assert found.evaluations == 40 <= grid.grid_size / 4 and found.cost < 40  # successive halving pruned some
        assert found.best.objective == max(t.objective for t in found.trials if t.state == "complete")
        ratios.append(found.best.objective / grid.best.objective)
    assert sum(r >= 0.95 for r in ratios) >= 7, ratios
    again = search.tpe(_surface(layers, 0), layers, ["all", "prompt"], st, budget=40, seed=0)
    first = search.tpe(_surface(layers, 0), layers, ["all", "prompt"], st, budget=40, seed=0)
    assert again == first  # seeded


def test_tune_on_a_tiny_model_end_to_end_and_resumes(one_thread, tmp_path):
    lm = tiny_lm()
    res = tune(lm, POS, NEG, layers=[1, 2], positions=["all", "prompt"], budget_evals=3, settings=TINY, seed=3,
               out=tmp_path / "run")
    assert res.split == {"train": 4, "validation": 2, "test": 2, "neutral_validation": 2, "neutral_test": 2,
                         "dropped": 0}
    assert res.search.mode == "tpe" and res.search.evaluations == 3 and res.search.grid_size == 12
    best = res.search.best
    assert (res.recommended.layer, res.recommended.alpha, res.recommended.positions) == (best.layer, best.alpha,
                                                                                          best.positions)
    assert res.test.effect.n == 2 and res.test.kl_worst5.n == 2 and res.test.validation_effect == best.effect
    vec = ss.SteeringVector.load(res.vector_path)
    use = vec.provenance.use
    assert vec.layers == [best.layer] and use.alpha == best.alpha and use.positions == best.positions
    assert use.effect == res.test.effect.value and use.effect_n == 2 and use.kl_budget == 1.0
    assert use.alpha_range[0] <= use.alpha <= use.alpha_range[1] and use.tuned_on == res.data_hash
    assert json.loads((tmp_path / "run" / "tune.json").read_text())["seed"] == 3
    assert "<img" in (tmp_path / "run" / "report.html").read_text()
    again = tune(lm, POS, NEG, layers=[1, 2], positions=["all", "prompt"], budget_evals=3, settings=TINY, seed=3,
                 out=tmp_path / "run")
    assert again == res  # every step read back from the run folder
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RecommendedAlpha)
        with ss.steering(lm, vec):  # the file carries its alpha
            pass


def test_exhaustive_scores_every_grid_point_once(one_thread):
    lm = tiny_lm()
    res = tune(lm, POS, NEG, layers=[1, 2], positions=["all"], exhaustive=True, settings=TINY, seed=0)
    s = res.search
    assert s.mode == "exhaustive" and s.evaluations == s.grid_size == 6 and res.vector_path is None
    assert res.vector.layers == [s.best.layer] and res.vector.provenance.use.alpha == s.best.alpha  # no folder needed
    assert {(t.layer, round(t.scale, 9)) for t in s.trials} == {(k, round(f, 9)) for k in (1, 2)
                                                                 for f in search.scale_grid(TINY)}
    assert s.best.objective == max(t.objective for t in s.trials)
    for t in s.trials:
        assert t.objective == pytest.approx(t.effect - TINY.kl_penalty * max(0.0, t.kl_worst5 - 1.0))


def test_tune_result_json_round_trip(one_thread):
    lm = tiny_lm()
    res = tune(lm, POS, NEG, layers=[2], positions=["all", "last-2"], budget_evals=2, settings=TINY)
    assert TuneResult.from_dict(json.loads(dumps(res.to_dict()))) == res
    assert set(res.summary()) == {"vector", "recommended", "test", "search"}


def test_bad_arguments_are_refused_before_any_model_work(one_thread):
    lm = tiny_lm()
    for kw, msg in [({"layers": [9]}, "out of range"), ({"kl_budget": -1.0}, "kl_budget"),
                    ({"budget_evals": 0}, "budget_evals"), ({"method": "nope"}, "unknown method"),
                    ({"positions": ["middle"]}, "not understood"), ({"scorer": "vibes"}, "unknown scorer")]:
        with pytest.raises(SteerscopeError, match=msg):
            tune(lm, POS, NEG, settings=TINY, **kw)
    with pytest.raises(DataError, match="at least 6"):
        tune(lm, POS[:5], NEG[:5], settings=TINY)


def test_a_callable_scorer_scores_greedy_responses(one_thread):
    lm = tiny_lm()
    calls = []

    def length(texts):
        calls.append(len(texts))
        return [len(t) for t in texts]
    res = tune(lm, POS, NEG, layers=[2], positions=["all"], scorer=length, budget_evals=1,
               settings=Settings(n_alphas=2, n_neutral=2, kl_tokens=2, n_boot=100, rungs=1, gen_tokens=3))
    assert res.scorer == "length" and "length" in res.test.metric and calls  # baseline + steered, val and test


def test_the_alpha_range_always_holds_the_recommended_alpha():
    """Seen on gemma3-270m formality: the best trial, penalised for KL over the budget, still won, and the range
    (budget-fitting trials only) was [1.22, 1.22] around a recommended 1.42."""
    from types import SimpleNamespace

    from steerscope.tune.tuner import alpha_range

    def trial(alpha: float, objective: float, kl: float) -> SimpleNamespace:
        return SimpleNamespace(state="complete", layer=3, positions="all", alpha=alpha, objective=objective,
                               kl_worst5=kl)

    best = trial(1.42, 5.0, 1.3)  # over the budget of 1.0
    rec = SimpleNamespace(best=best, trials=[best, trial(1.22, 4.8, 0.9), trial(0.5, 1.0, 0.1)])
    assert alpha_range(rec, 1.0) == (1.22, 1.42)  # type: ignore[arg-type]
    assert alpha_range(rec, 2.0) == (1.22, 1.42)  # type: ignore[arg-type]
    rec = SimpleNamespace(best=best, trials=[best])
    assert alpha_range(rec, 1.0) == (1.42, 1.42)  # type: ignore[arg-type]
