"""The mechanism card: each section against an independent computation, the card contract, resuming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import steerscope as ss
from steerscope.explain import KEYS, Settings, dose, explain, sparsity
from steerscope.explain import behaviour as B
from steerscope.explain.context import Context
from steerscope.runs import MemoryRun
from steerscope.steer import steering
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, smol_tokenizer, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(one_thread):
    return tiny_lm(layers=3)


@pytest.fixture(scope="module")
def vec(lm):
    return tiny_vector(lm, layer=1, scale=2.0)


@pytest.fixture(scope="module")
def card(lm, vec):
    return explain(lm, vec, PROMPTS, alpha=1.0, quick=True, show_progress=False)


@pytest.fixture(scope="module")
def beh(lm, vec):
    return B.build(lm, PROMPTS, vec, 1.0, n_tokens=8)


def _ctx(lm, vec, alpha: float = 1.0) -> Context:
    return Context(lm, vec, alpha, PROMPTS, Settings.quick(), MemoryRun(), show_progress=False)


def test_card_has_exactly_the_contract_keys_and_is_strict_json(card) -> None:
    d = card.to_dict()
    assert tuple(d) == KEYS
    json.dumps(d, allow_nan=False)  # non-finite numbers became null
    assert d["unsupported"] == {}
    assert all(d[k] is not None for k in KEYS if k != "unsupported")
    for mode in ("qk", "ov", "svv", "mlp"):
        assert math.isfinite(d["frozen"][mode]["effect_retained"]["value"])
    assert 0 < d["circuit"]["edge_fraction"] <= 1 and 0 < d["sparsity"]["fraction_needed"] <= 1
    assert isinstance(d["verdict"], str) and "EAP-IG" in d["verdict"]


def test_vector_section_relative_norm_is_norm_over_mean_residual_norm(lm, vec, card) -> None:
    from steerscope.steer import recording

    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS], padding_side="left")
    with recording(lm, ["blocks.1.resid_pre"]) as cache, torch.no_grad():
        lm.model(**enc)
    x = cache["blocks.1.resid_pre"]
    keep = enc["attention_mask"].bool().clone()
    keep[torch.arange(len(keep)), keep.float().argmax(1)] = False
    mean = float(x[keep].norm(dim=-1).mean())
    assert card.vector.mean_resid_norm["1"] == pytest.approx(mean, rel=1e-4)
    assert card.vector.relative_norm["1"] == pytest.approx(float(vec[1].norm()) / mean, rel=1e-4)


def test_lens_equals_a_plain_unembedding_matmul_with_and_without_the_final_norm(lm, vec, card) -> None:
    W_U = lm.model.get_output_embeddings().weight.detach().float()
    v = vec[1].float()
    norm = lm.model.model.norm
    normed = v / torch.sqrt(v.pow(2).mean() + norm.variance_epsilon) * norm.weight.detach().float()
    for key, x in (("raw", v), ("final_norm", normed)):
        logits = W_U @ x
        top = [lm.tokenizer.decode([i]) for i in logits.topk(10).indices.tolist()]
        bottom = [lm.tokenizer.decode([i]) for i in (-logits).topk(10).indices.tolist()]
        assert card.lens.top_positive[key] == top
        assert card.lens.top_negative[key] == bottom


def test_lens_flips_with_the_sign_of_alpha(lm, vec) -> None:
    from steerscope.explain import lens

    pos, neg = lens.section(_ctx(lm, vec, 1.0)), lens.section(_ctx(lm, vec, -1.0))
    assert pos.top_positive["raw"] == neg.top_negative["raw"]


def test_dose_kl_equals_a_direct_softmax_computation(lm, vec) -> None:
    prompts = dose.neutral_prompts(3)
    kls = dose.neutral_kl(lm, prompts, vec, [0.5, 2.0], batch_size=2)
    enc = lm.tokenize([lm.format_chat(p) for p in prompts], padding_side="left")
    with torch.no_grad():
        base = lm.model(**enc).logits.double()
        with steering(lm, vec, 2.0):
            other = lm.model(**enc).logits.double()
    m = enc["attention_mask"].bool()
    p, q = torch.softmax(base[m], -1).numpy(), torch.softmax(other[m], -1).numpy()
    direct = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(kls[2.0].numpy(), direct, rtol=1e-3, atol=1e-5)
    assert float(kls[2.0].mean()) > float(kls[0.5].mean()) > 0


def test_dose_grid_extends_down_until_an_alpha_fits_the_kl_budget(lm, vec) -> None:
    prompts = dose.neutral_prompts(3)
    big = [64.0, 128.0]
    kls = dose.neutral_kl(lm, prompts, vec, big, batch_size=2)
    q = {a: float(torch.quantile(k, 0.95)) for a, k in kls.items()}
    budget = 0.5 * min(q.values())  # nothing in the grid fits
    st = Settings(kl_budget=budget, batch_size=2)
    alphas = dose.extend_down(lm, prompts, vec, list(big), kls, st, max_halvings=8)
    added = [a for a in alphas if a not in big]
    assert len(added) == 1 and abs(added[0]) < 64.0 and alphas[0] == added[0]
    direct = dose.neutral_kl(lm, prompts, vec, [added[0]], batch_size=2)[added[0]]  # recomputed independently
    assert float(torch.quantile(direct, 0.95)) <= budget
    assert float(torch.quantile(dose.neutral_kl(lm, prompts, vec, [2 * added[0]], 2)[2 * added[0]], 0.95)) > budget
    assert dose.extend_down(lm, prompts, vec, list(big), kls, Settings(kl_budget=1e9)) == big  # fits: unchanged


def test_dose_recommendation_rules() -> None:
    rec = dose.recommend([0.5, 1.0, 2.0, 4.0], [1.0, 3.0, 6.0, 8.0], [0.1, 0.4, 0.9, 2.0], budget=1.0)
    assert rec["alpha_half_effect"] == 2.0 and rec["alpha_kl_max"] == 2.0 and rec["range"] == [2.0, 2.0]
    rec = dose.recommend([1.0, 2.0], [1.0, 8.0], [0.5, 3.0], budget=1.0)
    assert rec["range"] is None and rec["alpha_kl_max"] == 1.0


def test_effect_retained_is_one_as_steered_and_zero_without_the_vector(lm, vec, beh) -> None:
    assert beh.gap > 0
    assert beh.retained(B.metric_of(lm, beh.pb, vec, 1.0)) == pytest.approx(1.0, abs=1e-5)
    assert beh.retained(B.metric_of(lm, beh.pb, None, 0.0)) == pytest.approx(0.0, abs=1e-5)
    assert beh.retained(B.metric_of(lm, beh.pb, vec * 0.0, 1.0)) == pytest.approx(0.0, abs=1e-5)
    ctx = _ctx(lm, vec)
    r = torch.randn(lm.d_model)
    assert sparsity.retained_at(ctx, beh, r, "ie", 0) == pytest.approx(1.0, abs=1e-5)  # nothing zeroed
    from steerscope.analyses import sparsity as S

    none_kept = S.apply(vec, torch.zeros(lm.d_model, dtype=torch.bool))  # every dimension zeroed
    assert beh.retained(B.metric_of(lm, beh.pb, none_kept, 1.0)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["qk", "ov"])
def test_teacher_forced_freezing_equals_two_pass_patching(lm, vec, beh, mode: str) -> None:
    from steerscope import circuits as C
    from steerscope.hooks import attached

    site = "attn.pattern" if mode == "qk" else "attn.v"
    layers = range(1, lm.n_layers)
    base: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        with attached(lm, {f"blocks.{i}.{site}": (lambda x, _c, i=i: base.__setitem__(i, x.clone())) for i in layers}):
            C.forward(lm, beh.pb)
        with steering(lm, vec, 1.0), attached(lm, {f"blocks.{i}.{site}": (lambda x, _c, i=i: base[i]) for i in layers}):
            ref = C.metric(C.forward(lm, beh.pb).float(), beh.pb)
    got = B.frozen_metric(lm, beh.pb, vec, 1.0, mode, batch_size=3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


def test_tokens_reproduced_counts_through_the_first_eos() -> None:
    s = torch.tensor([[5, 6, 2, 0], [7, 8, 9, 4]])  # eos 2, pad 0
    o = torch.tensor([[5, 1, 2, 3], [7, 8, 1, 4]])
    assert B.tokens_reproduced(s, o, eos=2, pad=0) == pytest.approx(5 / 7)


def test_identifiability_of_the_vector_itself_is_one(lm, vec, beh) -> None:
    from steerscope.explain.intervals import ratio

    ms, mb = beh.m_steer.double().numpy(), beh.m_base.double().numpy()
    e = ratio(ms, ms, mb, 200, 0)
    r, lo, hi = e.value, *e.ci95
    assert r == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_attribution_shares_sum_to_one_and_match_the_steering_node(card) -> None:
    sh = {k: e.value for k, e in card.attribution.share.items()}
    assert sh["qk"] + sh["v"] + sh["mlp"] + sh["direct"] == pytest.approx(1.0, abs=1e-4)
    assert sh["heads"] == pytest.approx(sh["qk"] + sh["v"])


def test_a_callable_scorer_is_applied_to_the_generations(lm, vec) -> None:
    def n_chars(texts):
        return np.array([len(t) for t in texts], float)

    card = explain(lm, vec, PROMPTS[:2], alpha=1.0, scorer=n_chars, settings=Settings.quick(), show_progress=False)
    texts = ss.generate(lm, PROMPTS[:2], vector=vec, alpha=1.0, max_new_tokens=Settings.quick().gen_tokens)
    assert card.frozen.steered_scorer_mean == pytest.approx(np.mean([len(t) for t in texts]))
    assert card.vector.scorer["name"] == "n_chars" and card.sparsity.scorer["ie"]


def test_a_killed_run_resumes_from_its_records(lm, vec, tmp_path) -> None:
    out = tmp_path / "card"
    first = explain(lm, vec, PROMPTS[:3], alpha=1.0, quick=True, out=out, show_progress=False).to_dict()
    steps = out / "steps"
    kept = {p.name: p.stat().st_mtime_ns for p in steps.glob("*.json") if p.stem != "sparsity"}
    (steps / "sparsity.json").unlink()  # as if killed during the sparsity section
    again = explain(lm, vec, PROMPTS[:3], alpha=1.0, quick=True, out=out, show_progress=False).to_dict()
    assert {p.name: p.stat().st_mtime_ns for p in steps.glob("*.json") if p.stem != "sparsity"} == kept
    assert again["sparsity"]["effect_retained"] == first["sparsity"]["effect_retained"]
    assert json.loads((out / "card.json").read_text()) == again
    assert (out / "card.html").is_file()


def test_multi_layer_vector_analyses_the_layer_with_the_largest_relative_norm(lm) -> None:
    v = ss.SteeringVector({1: torch.randn(lm.d_model) * 0.01, 2: torch.randn(lm.d_model) * 5.0})
    from steerscope.explain import vector_info

    rec = vector_info.section(lm, v, PROMPTS)
    assert rec.analysed_layer == 2
    assert vector_info.section(lm, v, PROMPTS, layer=1).analysed_layer == 1


def test_non_resid_pre_vector_is_a_clear_error(lm) -> None:
    v = ss.SteeringVector({1: torch.randn(lm.d_model)}, site="resid_post")
    with pytest.raises(ss.SteerscopeError, match="resid_pre"):
        explain(lm, v, PROMPTS, alpha=1.0, quick=True, show_progress=False)


def test_a_bare_string_is_one_prompt(lm, vec) -> None:
    card = explain(lm, vec, "Tell me about your weekend.", alpha=1.0, settings=Settings.quick(), show_progress=False)
    assert card.vector.n_prompts == 1


def test_without_alpha_the_card_states_the_alpha_it_used_and_why_with_steered_and_unsteered_samples(lm, vec) -> None:
    card = explain(lm, vec, PROMPTS, alpha=None, quick=True, show_progress=False, sections=[])
    d = card.dose
    assert d.alpha_given is False and d.chosen_alpha in d.alphas and card.vector.alpha == d.chosen_alpha
    assert d.chosen_reason and d.chosen_reason != "given by the user"
    assert f"The card uses alpha {d.chosen_alpha:.3g} ({d.chosen_reason})." in card.verdict
    # the samples are the steered and unsteered greedy responses at that alpha, recomputed independently
    steered = ss.generate(lm, PROMPTS, vector=vec, alpha=d.chosen_alpha, max_new_tokens=Settings.quick().n_tokens)
    plain = ss.generate(lm, PROMPTS, max_new_tokens=Settings.quick().n_tokens)
    assert [s.prompt for s in d.samples] == PROMPTS
    assert [s.steered for s in d.samples] == steered and [s.unsteered for s in d.samples] == plain
    assert steered != plain
    given = explain(lm, vec, PROMPTS, alpha=d.chosen_alpha, quick=True, show_progress=False, sections=[]).dose
    assert given.alpha_given is True and given.chosen_reason == "given by the user"


def test_the_alpha_chosen_without_one_given_names_its_reason_in_every_case() -> None:
    alphas = [0.5, 1.0, 2.0]
    ranged = dose.recommend(alphas, [1.0, 3.0, 6.0], [0.1, 0.4, 0.9], budget=1.0)  # range [2, 2]
    weak = dose.recommend(alphas, [1.0, 2.0, 8.0], [0.1, 0.4, 3.0], budget=1.0)  # half the max only above the budget
    none = dose.recommend(alphas, [1.0, 2.0, 8.0], [2.0, 3.0, 4.0], budget=1.0)  # nothing within the budget
    assert dose._choose(None, ranged, alphas) == (2.0, "the upper end of the recommended range (largest alpha "
                                                        "within the KL budget)")
    a, why = dose._choose(None, weak, alphas)
    assert a == 1.0 and why.startswith("no recommended range") and "weak" in why
    a, why = dose._choose(None, none, alphas)
    assert a == 0.5 and why == "no alpha fits the KL budget: the smallest alpha tried"
    assert dose._choose(3.0, none, alphas) == (3.0, "given by the user")
