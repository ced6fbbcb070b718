"""Projection clamps (h <- h + (clip(h·v̂, lo, hi) - h·v̂) v̂) against a hand-written forward hook."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import batch_ids, make_tiny
from steerscope.conditional import Condition
from steerscope.errors import ConditionError
from steerscope.hooks import hook_count

FAMILIES = ["llama", "gemma2", "gpt2"]
LAYER = 2


def _vec(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ss.SteeringVector({LAYER: torch.randn(lm.d_model, generator=g)})


def _projections(lm, batch, vec):
    with torch.no_grad():
        h = lm.model(**batch, output_hidden_states=True).hidden_states[LAYER]
    return h @ (vec[LAYER] / vec[LAYER].norm()).to(h.dtype)


def _by_hand(lm, batch, vec, lo, hi):
    """Logits with a plain forward pre-hook on block LAYER that clips each row's projection into [lo[b], hi[b]]."""
    r = vec[LAYER] / vec[LAYER].norm()

    def pre(_m, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        for b in range(x.shape[0]):
            p = x[b] @ r
            x[b] = x[b] + (p.clamp(min=lo[b], max=hi[b]) - p)[:, None] * r
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = lm.blocks[LAYER].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return lm.model(**batch).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_projection_clamp_equals_a_hand_written_hook(family):
    lm = make_tiny(family, seed=3)
    batch, vec = batch_ids(n=3, length=6, left_pad=2, seed=2), _vec(lm)
    p = _projections(lm, batch, vec)
    lo = [float(p[b].quantile(0.3)) for b in range(3)]
    hi = [float(p[b].quantile(0.7)) for b in range(3)]
    with ss.clamping(lm, vec, lo=lo, hi=hi), torch.no_grad():
        got = lm.model(**batch).logits
    with torch.no_grad():
        plain = lm.model(**batch).logits
    assert not torch.allclose(got, plain)
    torch.testing.assert_close(got, _by_hand(lm, batch, vec, lo, hi), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_clamp_whose_range_holds_every_projection_changes_nothing(family):
    lm = make_tiny(family, seed=3)
    batch, vec = batch_ids(n=3, length=6, left_pad=2, seed=2), _vec(lm)
    p = _projections(lm, batch, vec)
    with torch.no_grad():
        plain = lm.model(**batch).logits
    with ss.clamping(lm, vec, lo=float(p.min()) - 1, hi=float(p.max()) + 1), torch.no_grad():
        assert torch.equal(lm.model(**batch).logits, plain)
    with ss.clamping(lm, vec, hi=float(p.max()) + 1), torch.no_grad():  # one side open
        assert torch.equal(lm.model(**batch).logits, plain)


def test_the_clamped_projection_lies_in_the_range_and_one_sided_clamps_work():
    lm = make_tiny("llama", seed=3)
    batch, vec = batch_ids(n=2, length=6, seed=2), _vec(lm)
    r = vec[LAYER] / vec[LAYER].norm()
    for lo, hi in ((-0.01, 0.01), (0.05, None), (None, -0.05)):
        with ss.clamping(lm, vec, lo=lo, hi=hi), ss.recording(lm, [f"blocks.{LAYER}.resid_pre"]) as c, \
                torch.no_grad():
            lm.model(**batch)
        p = c[f"blocks.{LAYER}.resid_pre"] @ r
        assert lo is None or float(p.min()) >= lo - 1e-6
        assert hi is None or float(p.max()) <= hi + 1e-6
        assert lo is None or hi is None or not torch.allclose(p, torch.full_like(p, lo))


def test_a_gated_clamp_touches_only_rows_whose_gate_is_open():
    lm = make_tiny("llama", seed=3)
    batch, vec = batch_ids(n=4, length=6, left_pad=2, seed=2), _vec(lm)
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        h = lm.model(**batch, output_hidden_states=True).hidden_states[1]
    m = batch["attention_mask"].bool()
    scores = torch.stack([(h[b][m[b]] @ (d / d.norm())).mean() for b in range(4)])
    thr = float(scores.median())
    cond, opened = Condition(d, 1, thr), scores > thr
    with torch.no_grad():
        plain = lm.model(**batch).logits
    with ss.clamping(lm, vec, lo=-0.01, hi=0.01), torch.no_grad():
        clamped = lm.model(**batch).logits
    with ss.clamping(lm, vec, lo=-0.01, hi=0.01, condition=cond), torch.no_grad():
        gated = lm.model(**batch).logits
    assert 0 < int(opened.sum()) < 4
    for b in range(4):
        assert torch.equal(gated[b], clamped[b] if opened[b] else plain[b]), b


def test_bad_clamps_raise_one_line_errors():
    lm = make_tiny("llama", seed=3)
    vec, batch = _vec(lm), batch_ids(n=2, length=6)
    with pytest.raises(ConditionError, match="either value"):
        with ss.clamping(lm, vec, 1.0, lo=0.0):
            pass
    with pytest.raises(ConditionError, match="either value"):
        with ss.clamping(lm, vec):
            pass
    with pytest.raises(ConditionError, match="finite"):
        with ss.clamping(lm, vec, lo=float("nan")):
            pass
    with pytest.raises(ConditionError, match="3 per-row"):
        with ss.clamping(lm, vec, lo=[0.0, 0.0, 0.0]), torch.no_grad():
            lm.model(**batch)


@pytest.mark.parametrize("make_ctx", [
    lambda lm, v: ss.clamping(lm, v, lo=-0.01, hi=0.01),
    lambda lm, v: ss.clamping(lm, v, lo=[-0.01, 0.0], positions="last-2"),
    lambda lm, v: ss.clamping(lm, v, hi=0.0, condition=Condition(torch.ones(lm.d_model), 1, 0.0, on="token")),
])
def test_clamps_restore_the_model_after_exit_and_exception(make_ctx):
    lm = make_tiny("llama", seed=3)
    vec, batch = _vec(lm), batch_ids(n=2, length=6, left_pad=1)
    before = hook_count(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch).logits
    with make_ctx(lm, vec), torch.no_grad():
        lm.model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(RuntimeError, match="boom"):
        with make_ctx(lm, vec), torch.no_grad():
            lm.model(**batch)
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(ref, lm.model(**batch).logits)
    assert hook_count(lm.model) == before


def test_a_clamp_spec_round_trips_through_json_and_applies_as_clamping():
    import json

    from steerscope.conditional.clamp import Clamp

    lm = make_tiny("llama", seed=3)
    vec, batch = _vec(lm), batch_ids(n=2, length=6, left_pad=1)
    cond = Condition(torch.ones(lm.d_model), 1, 0.0, on="token")
    spec = Clamp(vec, lo=[-0.01, 0.0], hi=0.02, positions="all", condition=cond)
    back = Clamp.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.to_dict() == spec.to_dict()
    with back.active(lm), torch.no_grad():
        got = lm.model(**batch).logits
    with ss.clamping(lm, vec, lo=[-0.01, 0.0], hi=0.02, condition=cond), torch.no_grad():
        assert torch.equal(got, lm.model(**batch).logits)
    for bad, match in (({"vector": {"2": [1.0]}}, "lo, hi"), ({"vector": [1.0], "hi": 1}, "vector"),
                       ({"vector": {"2": [1.0]}, "hi": "x"}, "hi"), ({"vector": {"2": [1.0]}, "hi": 1, "x": 0}, "x")):
        with pytest.raises(ConditionError, match=match):
            Clamp.from_dict(bad)
