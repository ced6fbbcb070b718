"""Conditional steering: gates read from each row's own residual, against hand computations and plain steering."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

import steerscope as ss
from conftest import batch_ids, make_tiny
from steerscope.conditional import Condition, Not, gate_from_dict
from steerscope.conditional.gate import reduce_prompt, reduce_running
from steerscope.conditional.rules import Rule, conditional_steering
from steerscope.errors import ConditionError
from steerscope.hooks import hook_count

FAMILIES = ["llama", "gemma2", "gpt2"]
KW = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


def _vec(lm, layer=2, seed=0, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    return ss.SteeringVector({layer: scale * torch.randn(lm.d_model, generator=g)})


def _hidden(lm, batch, layer):
    with torch.no_grad():
        return lm.model(**batch, output_hidden_states=True).hidden_states[layer]


def _hand_prompt_scores(lm, batch, direction, layer, how):
    """The reduced projection per row, computed from output_hidden_states without steerscope's gate code."""
    h = _hidden(lm, batch, layer).float()
    u = direction / direction.norm()
    out = []
    for row, m in zip(h, batch["attention_mask"]):
        p = row[m.bool()] @ u
        out.append({"mean": p.mean(), "max": p.max(), "last": p[-1]}[how])
    return torch.stack(out)


def _split_condition(lm, batch, layer=1, how="mean", seed=3, on="prompt"):
    """A condition whose threshold sits between the rows' scores (so some gates open, some stay shut)."""
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))
    s = _hand_prompt_scores(lm, batch, d, layer, how).sort().values
    mid = len(s) // 2
    return Condition(d, layer, float((s[mid - 1] + s[mid]) / 2), reduce=how, on=on)


def _rows(batch, i):
    m = batch["attention_mask"][i].bool()
    return {k: v[i : i + 1, m] for k, v in batch.items()}  # the row alone, unpadded


# -- pure math ---------------------------------------------------------------------------------------


def test_reduce_prompt_ignores_padding_on_either_side():
    p = torch.tensor([[9.0, 1.0, 3.0], [2.0, 5.0, 9.0], [7.0, 7.0, 7.0]])
    m = torch.tensor([[False, True, True], [True, True, False], [False, False, False]])
    assert reduce_prompt(p, m, "mean")[:2].tolist() == [2.0, 3.5]
    assert reduce_prompt(p, m, "max")[:2].tolist() == [3.0, 5.0]
    assert reduce_prompt(p, m, "last")[:2].tolist() == [3.0, 5.0]
    assert all(reduce_prompt(p, m, how)[2] == -torch.inf for how in ("mean", "max", "last"))


@pytest.mark.parametrize("how", ["mean", "max", "last"])
def test_running_reduce_in_pieces_equals_one_pass_and_prefix_reduction(how):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 7, generator=g)
    m = torch.ones(3, 7, dtype=torch.bool)
    m[0, :2] = False
    whole, _ = reduce_running(p, m, how, None)
    a, carry = reduce_running(p[:, :4], m[:, :4], how, None)
    b, _ = reduce_running(p[:, 4:], m[:, 4:], how, carry)
    torch.testing.assert_close(torch.cat([a, b], 1), whole)
    for t in range(2, 7):
        torch.testing.assert_close(whole[:, t], reduce_prompt(p[:, : t + 1], m[:, : t + 1], how))


# -- the data --------------------------------------------------------------------------------------


def test_gates_round_trip_through_json():
    a = Condition(torch.randn(8), 2, 0.5, reduce="max", on="token", center=torch.randn(8), scale=2.0)
    b = Condition(torch.randn(8), 1, -1.0)
    gate = (a | ~b) & b
    back = gate_from_dict(json.loads(json.dumps(gate.to_dict())))
    assert back.to_dict() == gate.to_dict()
    assert isinstance(back.a.b, Not) and back.a.a.on == "token"  # type: ignore[attr-defined]
    assert len(gate.leaves()) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(direction=torch.zeros(8), layer=1, threshold=0.0), "non-zero"),
    (dict(direction=torch.tensor([1.0, float("nan")]), layer=1, threshold=0.0), "finite"),
    (dict(direction=torch.ones(8), layer=-1, threshold=0.0), "layer"),
    (dict(direction=torch.ones(8), layer=1, threshold=0.0, reduce="median"), "reduce"),
    (dict(direction=torch.ones(8), layer=1, threshold=0.0, on="step"), "on"),
    (dict(direction=torch.ones(8), layer=1, threshold=float("inf")), "threshold"),
    (dict(direction=torch.ones(8), layer=1, threshold=0.0, scale=0.0), "scale"),
    (dict(direction=torch.ones(8), layer=1, threshold=0.0, center=torch.ones(3)), "center"),
])
def test_bad_conditions_raise_one_line_errors(kwargs, match):
    with pytest.raises(ConditionError, match=match):
        Condition(**kwargs)


@pytest.mark.parametrize("data, match", [
    ({"kind": "xor"}, "xor"), ({"kind": "not"}, "of"), ({"direction": [1.0], "layer": 0}, "threshold"),
    ({"direction": [1.0], "layer": 0, "threshold": 0, "alpha": 1}, "alpha"), ([1, 2], "JSON object"),
])
def test_bad_condition_data_raise_one_line_errors(data, match):
    with pytest.raises(ConditionError, match=match):
        gate_from_dict(data)


# -- gated steering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["mean", "last", "max"])
def test_gated_batch_equals_per_row_alpha_steering_with_the_hand_computed_gate(family, how):
    lm = make_tiny(family, seed=2)
    batch = batch_ids(n=4, length=6, left_pad=2, seed=1)
    cond = _split_condition(lm, batch, how=how)
    hand = _hand_prompt_scores(lm, batch, cond.direction, cond.layer, how) > cond.threshold
    assert 0 < int(hand.sum()) < 4
    vec = _vec(lm)
    with ss.steering(lm, vec, 4.0, condition=cond), torch.no_grad():
        gated = lm.model(**batch).logits
    with ss.steering(lm, vec, (4.0 * hand.float()).tolist()), torch.no_grad():
        ref = lm.model(**batch).logits
    assert torch.equal(gated, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_shut_rows_generate_the_unsteered_tokens_and_open_rows_the_steered_ones(family):
    lm = make_tiny(family, seed=2)
    batch = batch_ids(n=4, length=6, left_pad=2, seed=1)
    cond = _split_condition(lm, batch)
    hand = _hand_prompt_scores(lm, batch, cond.direction, cond.layer, "mean") > cond.threshold
    vec = _vec(lm)
    with ss.steering(lm, vec, 4.0, condition=cond), torch.no_grad():
        cached = lm.model.generate(**batch, **KW)
    with ss.steering(lm, vec, 4.0, condition=cond), torch.no_grad():
        assert torch.equal(cached, lm.model.generate(**batch, **KW, use_cache=False))  # decided once, from the prompt
    with torch.no_grad():
        plain = lm.model.generate(**batch, **KW)
    assert not torch.equal(cached, plain)  # the vector changes the open rows: the test can fail
    for i in range(4):
        one = _rows(batch, i)
        ctx = ss.steering(lm, vec, 4.0) if hand[i] else nullcontext()  # steered alone, or not at all
        with ctx, torch.no_grad():
            alone = lm.model.generate(**one, **KW)
        assert torch.equal(cached[i, -KW["max_new_tokens"]:], alone[0, -KW["max_new_tokens"]:]), (i, bool(hand[i]))


def test_per_row_vectors_and_alphas_are_gated_too():
    lm = make_tiny("llama", seed=2)
    batch = batch_ids(n=4, length=6, left_pad=2, seed=1)
    cond = _split_condition(lm, batch)
    hand = (_hand_prompt_scores(lm, batch, cond.direction, cond.layer, "mean") > cond.threshold).float()
    vecs, alphas = [_vec(lm, seed=i) for i in range(4)], [1.0, -2.0, 3.0, 4.0]
    with ss.steering(lm, vecs, alphas, condition=cond), torch.no_grad():
        gated = lm.model(**batch).logits
    with ss.steering(lm, vecs, [a * float(g) for a, g in zip(alphas, hand)]), torch.no_grad():
        ref = lm.model(**batch).logits
    assert torch.equal(gated, ref)


@pytest.mark.parametrize("how", ["last", "mean", "max"])
def test_token_gates_follow_each_position_and_do_not_depend_on_the_kv_cache(how):
    lm = make_tiny("llama", seed=2)
    batch = batch_ids(n=3, length=6, left_pad=2, seed=1)
    layer, vec = 2, _vec(lm, layer=2)
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5))
    h = _hidden(lm, batch, layer).float()
    p = h @ (d / d.norm())
    m = batch["attention_mask"].bool()
    scores = torch.full_like(p, -torch.inf)  # running reduction over the real tokens up to each position
    for b in range(3):
        for t in range(6):
            seen = p[b, : t + 1][m[b, : t + 1]]
            if m[b, t]:
                scores[b, t] = {"mean": seen.mean(), "max": seen.max(), "last": seen[-1]}[how]
    thr = float(scores[m].median()) - 1e-4  # between distinct scores
    hand = scores > thr
    assert hand[m].any() and not hand[m].all()
    cond = Condition(d, layer, thr, reduce=how, on="token")
    with ss.steering(lm, vec, 4.0, condition=cond), torch.no_grad():
        gated = lm.model(**batch).logits
    delta = vec[layer]

    def pre(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x + 4.0 * hand[..., None].to(x.dtype) * delta
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
    handle = lm.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = lm.model(**batch).logits
    finally:
        handle.remove()
    torch.testing.assert_close(gated, ref, rtol=0, atol=0)
    with ss.steering(lm, vec, 4.0, condition=cond), torch.no_grad():
        cached = lm.model.generate(**batch, **KW)
    with ss.steering(lm, vec, 4.0, condition=cond), torch.no_grad():
        assert torch.equal(cached, lm.model.generate(**batch, **KW, use_cache=False))


def test_composed_gates_are_the_boolean_combinations():
    lm = make_tiny("llama", seed=2)
    batch = batch_ids(n=4, length=6, left_pad=2, seed=1)
    a, b = _split_condition(lm, batch, seed=3), _split_condition(lm, batch, layer=0, seed=6)
    ga, gb = ((_hand_prompt_scores(lm, batch, c.direction, c.layer, "mean") > c.threshold) for c in (a, b))
    vec = _vec(lm)
    for gate, want in ((~a, ~ga), (a | b, ga | gb), (a & b, ga & gb), (a & ~b, ga & ~gb)):
        with ss.steering(lm, vec, 4.0, condition=gate), torch.no_grad():
            gated = lm.model(**batch).logits
        with ss.steering(lm, vec, (4.0 * want.float()).tolist()), torch.no_grad():
            ref = lm.model(**batch).logits
        assert torch.equal(gated, ref), gate.to_dict()["kind"]


def test_rules_first_match_wins_per_row_and_unmatched_rows_stay_unsteered():
    lm = make_tiny("llama", seed=2)
    batch = batch_ids(n=4, length=6, left_pad=2, seed=1)
    a, b = _split_condition(lm, batch, seed=3), _split_condition(lm, batch, layer=0, seed=6)
    ga, gb = ((_hand_prompt_scores(lm, batch, c.direction, c.layer, "mean") > c.threshold) for c in (a, b))
    assert (ga & gb).any() and (~ga & ~gb).any() and (~ga & gb).any()
    v1, v2 = _vec(lm, seed=1), _vec(lm, seed=2)
    with conditional_steering(lm, [(a, v1, 2.0), Rule(b, v2, -3.0)]), torch.no_grad():
        got = lm.model(**batch).logits
    vecs = [v1 if x else v2 for x in ga.tolist()]
    alphas = [2.0 if x else (-3.0 if y else 0.0) for x, y in zip(ga.tolist(), gb.tolist())]
    with ss.steering(lm, vecs, alphas), torch.no_grad():
        ref = lm.model(**batch).logits
    assert torch.equal(got, ref)
    with conditional_steering(lm, [(a, v1, 2.0), (None, v2, -3.0)]), torch.no_grad():
        got = lm.model(**batch).logits
    with ss.steering(lm, vecs, [2.0 if x else -3.0 for x in ga.tolist()]), torch.no_grad():
        ref = lm.model(**batch).logits
    assert torch.equal(got, ref)


def test_bad_gated_steering_raises_one_line_errors():
    lm = make_tiny("llama", seed=2)
    vec = _vec(lm, layer=1)
    with pytest.raises(ConditionError, match="unsteered residual"):
        with ss.steering(lm, vec, 1.0, condition=Condition(torch.ones(lm.d_model), 2, 0.0)):
            pass
    with pytest.raises(ConditionError, match="dims"):
        with ss.steering(lm, vec, 1.0, condition=Condition(torch.ones(3), 1, 0.0)):
            pass
    with pytest.raises(ConditionError, match="rule"):
        with conditional_steering(lm, [(vec, 1.0)]):
            pass
    with pytest.raises(ConditionError, match="combine"):
        Condition(torch.ones(3), 1, 0.0) | 3  # type: ignore[operator]


@pytest.mark.parametrize("make_ctx", [
    lambda lm, v, c: ss.steering(lm, v, 1.0, condition=c),
    lambda lm, v, c: ss.steering(lm, v, 1.0, condition=~c | Condition(c.direction, 0, 0.0, on="token")),
    lambda lm, v, c: conditional_steering(lm, [(c, v, 1.0), (None, v, -1.0)], positions="last-2"),
])
def test_gated_contexts_restore_the_model_after_exit_and_exception(make_ctx):
    lm = make_tiny("llama", seed=2)
    batch = batch_ids(n=4, length=6, left_pad=2, seed=1)
    cond, vec = _split_condition(lm, batch), _vec(lm)
    before = hook_count(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch).logits
    with make_ctx(lm, vec, cond), torch.no_grad():
        lm.model.generate(**batch, **KW)
    with pytest.raises(RuntimeError, match="boom"):
        with make_ctx(lm, vec, cond), torch.no_grad():
            lm.model(**batch)
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(ref, lm.model(**batch).logits)
    assert hook_count(lm.model) == before
