"""Steering, ablation, clamping, patching and orthogonalisation against hand-made references."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import batch_ids, make_tiny
from steerscope.errors import SiteError, VectorError
from steerscope.hooks import hook_count


class AddToInput(torch.nn.Module):
    """Hand-made reference: wraps a block and edits its input hidden state (no hooks)."""

    def __init__(self, block, delta, cols=None):
        super().__init__()
        self.block, self.delta, self.cols = block, delta, cols

    def forward(self, hidden_states, *args, **kwargs):
        if self.cols is None:
            hidden_states = hidden_states + self.delta
        else:
            hidden_states = hidden_states.clone()
            for row, col in self.cols:
                if col < hidden_states.shape[1]:
                    hidden_states[row, col] += self.delta
        return self.block(hidden_states, *args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


def _by_hand(lm, layer, delta, fn, cols=None):
    layers = lm.model.model.layers
    orig = layers[layer]
    layers[layer] = AddToInput(orig, delta, cols)
    try:
        return fn()
    finally:
        layers[layer] = orig


@pytest.fixture(scope="module")
def lm():
    return make_tiny("llama", seed=1)


def _vec(lm, layers=(2,), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return ss.SteeringVector({l: scale * torch.randn(lm.d_model, generator=g) for l in layers})


def test_hook_steering_equals_editing_hidden_state_by_hand(lm):
    vec, batch = _vec(lm), batch_ids()
    with ss.steering(lm, vec, alpha=0.7), torch.no_grad():
        hooked = lm.model(**batch).logits
    with torch.no_grad():
        manual = _by_hand(lm, 2, 0.7 * vec[2], lambda: lm.model(**batch).logits)
        plain = lm.model(**batch).logits
    torch.testing.assert_close(hooked, manual, rtol=0, atol=0)
    assert (hooked - plain).abs().max() > 1e-3


def test_steered_greedy_generation_equals_hand_edit(lm):
    vec, batch = _vec(lm), batch_ids(n=1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with ss.steering(lm, vec, alpha=2.0), torch.no_grad():
        hooked = lm.model.generate(**batch, **kw)
    with torch.no_grad():
        manual = _by_hand(lm, 2, 2.0 * vec[2], lambda: lm.model.generate(**batch, **kw))
    assert torch.equal(hooked, manual)


def test_last_k_positions_with_left_padding_touch_only_real_last_tokens(lm):
    vec, batch = _vec(lm), batch_ids(n=2, length=7, left_pad=3)
    with ss.steering(lm, vec, alpha=1.0, positions="last-2"), torch.no_grad():
        hooked = lm.model(**batch).logits
    cols = [(0, 5), (0, 6), (1, 5), (1, 6)]
    with torch.no_grad():
        manual = _by_hand(lm, 2, vec[2], lambda: lm.model(**batch).logits, cols)
    torch.testing.assert_close(hooked, manual, rtol=0, atol=1e-6)


def test_explicit_nonnegative_positions_count_from_first_real_token(lm):
    vec, batch = _vec(lm), batch_ids(n=2, length=7, left_pad=3)
    with ss.steering(lm, vec, alpha=1.0, positions=[0]), torch.no_grad():
        hooked = lm.model(**batch).logits
    with torch.no_grad():
        manual = _by_hand(lm, 2, vec[2], lambda: lm.model(**batch).logits, [(0, 3), (1, 0)])
    torch.testing.assert_close(hooked, manual, rtol=0, atol=1e-6)


def test_right_padding_last_position_is_last_real_token(lm):
    vec = _vec(lm)
    batch = batch_ids(n=2, length=7)
    batch["attention_mask"][0, 5:] = 0  # right padding on row 0
    with ss.steering(lm, vec, alpha=1.0, positions=[-1]), torch.no_grad():
        hooked = lm.model(**batch).logits
    with torch.no_grad():
        manual = _by_hand(lm, 2, vec[2], lambda: lm.model(**batch).logits, [(0, 4), (1, 6)])
    torch.testing.assert_close(hooked[0, :5], manual[0, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(hooked[1], manual[1], rtol=0, atol=1e-6)


def test_prompt_and_generated_positions_partition_all(lm):
    vec, batch = _vec(lm), batch_ids(n=1)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with ss.recording(lm, ["blocks.3.resid_pre"]) as base, torch.no_grad():
        lm.model.generate(**batch, **kw)
    deltas = {}
    for pos in ("prompt", "generated", "all"):
        with ss.steering(lm, vec, 1.0, positions=pos), ss.recording(lm, ["blocks.2.resid_pre"]) as c, torch.no_grad():
            lm.model.generate(**batch, **kw)
        deltas[pos] = c.calls("blocks.2.resid_pre")
    # the prefill call is steered under prompt/all only; decode calls under generated/all only
    assert len(deltas["prompt"]) == 5 and base is not None
    with ss.recording(lm, ["blocks.2.resid_pre"]) as ref, torch.no_grad():
        lm.model.generate(**batch, **kw)
    r0 = ref.calls("blocks.2.resid_pre")[0]
    torch.testing.assert_close(deltas["prompt"][0], r0 + vec[2])
    torch.testing.assert_close(deltas["generated"][0], r0)
    torch.testing.assert_close(deltas["all"][0], r0 + vec[2])


def test_last_and_generated_steers_the_last_prompt_token_then_every_decoded_token(lm):
    vec, batch = _vec(lm), batch_ids(n=2, length=7, left_pad=3)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with ss.recording(lm, ["blocks.2.resid_pre"]) as ref, torch.no_grad():
        lm.model.generate(**batch, **kw)
    with ss.steering(lm, vec, 1.0, positions="last+generated"), ss.recording(lm, ["blocks.2.resid_pre"]) as c, \
            torch.no_grad():
        lm.model.generate(**batch, **kw)
    got, base = c.calls("blocks.2.resid_pre"), ref.calls("blocks.2.resid_pre")
    # prefill: only column 6 (each row's last real prompt token) moves by exactly vec
    torch.testing.assert_close(got[0][:, :6], base[0][:, :6])
    torch.testing.assert_close(got[0][:, 6], base[0][:, 6] + vec[2])
    assert all(x.shape[1] == 1 for x in got[1:]) and len(got) == 4  # each decode call is steered (x differs)
    with ss.steering(lm, vec, 1.0, positions="last-1"), ss.recording(lm, ["blocks.2.resid_pre"]) as c1, \
            torch.no_grad():
        lm.model.generate(**batch, **kw)
    assert not torch.allclose(got[1], c1.calls("blocks.2.resid_pre")[1])  # last-1 leaves decode calls alone


def test_per_row_alphas_in_one_batch_equal_separate_runs(lm):
    vec = _vec(lm)
    batch = batch_ids(n=3)
    with ss.steering(lm, vec, alpha=[0.0, 1.0, -2.0]), torch.no_grad():
        joint = lm.model(**batch).logits
    for i, a in enumerate([0.0, 1.0, -2.0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        with ss.steering(lm, vec, alpha=a), torch.no_grad():
            sep = lm.model(**one).logits
        torch.testing.assert_close(joint[i : i + 1], sep, rtol=1e-5, atol=1e-5)


def test_per_row_vectors_in_batched_generation(lm):
    v1, v2 = _vec(lm, seed=1), _vec(lm, seed=2)
    batch = batch_ids(n=2)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with ss.steering(lm, [v1, v2], alpha=2.0), torch.no_grad():
        joint = lm.model.generate(**batch, **kw)
    for i, v in enumerate([v1, v2]):
        with ss.steering(lm, v, alpha=2.0), torch.no_grad():
            sep = lm.model.generate(**{k: t[i : i + 1] for k, t in batch.items()}, **kw)
        assert torch.equal(joint[i], sep[0])


def test_several_layers_at_once_equal_nested_contexts(lm):
    vec = _vec(lm, layers=(1, 3))
    batch = batch_ids()
    with ss.steering(lm, vec, 1.5), torch.no_grad():
        a = lm.model(**batch).logits
    with ss.steering(lm, vec.select([1]), 1.5), ss.steering(lm, vec.select([3]), 1.5), torch.no_grad():
        b = lm.model(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make_ctx", [
    lambda lm, v: ss.steering(lm, v, 1.0),
    lambda lm, v: ss.steering(lm, v, 1.0, positions="last-1"),
    lambda lm, v: ss.ablation(lm, v),
    lambda lm, v: ss.clamping(lm, v, 2.0),
    lambda lm, v: ss.recording(lm, ["blocks.1.attn.pattern", "blocks.2.attn.z", "blocks.0.attn.v"]),
    lambda lm, v: ss.patching(lm, {"blocks.1.resid_pre": torch.zeros(2, 7, lm.d_model)}),
])
def test_model_is_bit_identical_after_exit_and_after_exception(lm, make_ctx):
    vec, batch = _vec(lm), batch_ids()
    before_hooks = hook_count(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch).logits
    with make_ctx(lm, vec), torch.no_grad():
        lm.model(**batch)
    with pytest.raises(RuntimeError, match="boom"):
        with make_ctx(lm, vec), torch.no_grad():
            lm.model(**batch)
            raise RuntimeError("boom")
    with torch.no_grad():
        after = lm.model(**batch).logits
    assert torch.equal(ref, after)
    assert hook_count(lm.model) == before_hooks
    assert lm.model.config._attn_implementation != "steerscope"


def test_directional_ablation_leaves_no_component_in_residual(lm):
    r = torch.randn(lm.d_model)
    r_hat = r / r.norm()
    sites = [f"blocks.{l}.resid_pre" for l in range(lm.n_layers)] + [f"blocks.{lm.n_layers - 1}.resid_post"]
    with ss.ablation(lm, r), ss.recording(lm, sites) as c, torch.no_grad():
        lm.model(**batch_ids())
    for s in sites:
        assert (c[s] @ r_hat).abs().max() < 1e-4


def test_weight_orthogonalisation_equals_directional_ablation(lm):
    r = 5 * torch.randn(lm.d_model)
    batch = batch_ids()
    with ss.ablation(lm, r), torch.no_grad():
        ablated = lm.model(**batch).logits
    ortho = ss.orthogonalize(lm, r)
    with torch.no_grad():
        out = ortho.model(**batch).logits
    torch.testing.assert_close(out, ablated, rtol=1e-4, atol=1e-4)


def test_orthogonalisation_of_tied_model_keeps_readout(smol_tokenizer):
    tied = make_tiny("gpt2", seed=3)
    r = torch.randn(tied.d_model)
    batch = batch_ids()
    with ss.ablation(tied, r), torch.no_grad():
        ablated = tied.model(**batch).logits
    with torch.no_grad():
        out = ss.orthogonalize(tied, r).model(**batch).logits
    torch.testing.assert_close(out, ablated, rtol=1e-4, atol=1e-4)


def test_clamping_sets_the_projection(lm):
    vec = _vec(lm)
    r_hat = vec[2] / vec[2].norm()
    with ss.clamping(lm, vec, 4.0), ss.recording(lm, ["blocks.2.resid_pre"]) as c, torch.no_grad():
        lm.model(**batch_ids())
    # recording hooks run after the clamping hook registered before them on the same module
    torch.testing.assert_close(c["blocks.2.resid_pre"] @ r_hat, torch.full((2, 7), 4.0), rtol=1e-5, atol=1e-4)


def test_patching_from_another_run_reproduces_that_run(lm):
    a, b = batch_ids(seed=1), batch_ids(seed=2)
    with ss.recording(lm, ["blocks.2.resid_pre"]) as c, torch.no_grad():
        ref = lm.model(**a).logits
    with ss.patching(lm, {"blocks.2.resid_pre": c["blocks.2.resid_pre"]}), torch.no_grad():
        out = lm.model(**b).logits
    torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)  # causal: last pos sees patched


def test_bad_inputs_raise_clear_errors(lm):
    with pytest.raises(VectorError, match="d_model"):
        with ss.steering(lm, ss.SteeringVector({1: torch.ones(7)}), 1.0):
            pass
    with pytest.raises(VectorError, match="out of range"):
        with ss.steering(lm, ss.SteeringVector({99: torch.ones(lm.d_model)}), 1.0):
            pass
    with pytest.raises(VectorError, match="finite"):
        with ss.steering(lm, _vec(lm), float("nan")):
            pass
    with pytest.raises(SiteError, match="positions"):
        with ss.steering(lm, _vec(lm), 1.0, positions="middle"):
            pass
    with pytest.raises(SiteError, match="out of range"):
        with ss.recording(lm, ["blocks.9.resid_pre"]):
            pass
    with pytest.raises(SiteError, match="shape"):
        with ss.patching(lm, {"blocks.1.resid_pre": torch.zeros(1, 3, lm.d_model)}), torch.no_grad():
            lm.model(**batch_ids())


CACHE_SPECS = ["all", "prompt", "generated", "last-2", [-1], [0, -1], "last+generated"]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_steered_positions_do_not_depend_on_the_kv_cache(family):
    tiny = make_tiny(family, seed=2)
    vec, batch = _vec(tiny, layers=(1,), scale=6.0), batch_ids(n=2, length=6, left_pad=2)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)

    def run(spec, cache):
        with ss.steering(tiny, vec, alpha=4.0, positions=spec), torch.no_grad():
            return tiny.model.generate(**batch, **kw, use_cache=cache)

    with torch.no_grad():
        plain = tiny.model.generate(**batch, **kw)
        assert torch.equal(plain, tiny.model.generate(**batch, **kw, use_cache=False))
    for spec in CACHE_SPECS:
        cached = run(spec, True)
        assert torch.equal(cached, run(spec, False)), spec
        if spec == "generated":  # the vector is strong enough to change the output, so the test can fail
            assert not torch.equal(cached, plain)


def test_steering_accepts_a_raw_tensor_with_layer_and_a_saved_vector_file(lm, tmp_path):
    vec, batch = _vec(lm, layers=(2,)), batch_ids()
    with ss.steering(lm, vec, alpha=0.7), torch.no_grad():
        ref = lm.model(**batch).logits
    path = vec.save(tmp_path / "v.safetensors")
    for given, layer in ((vec[2], 2), (path, None), (str(path), None),
                         (ss.SteeringVector({1: torch.ones(lm.d_model), 2: vec[2]}), 2)):
        with ss.steering(lm, given, alpha=0.7, layer=layer), torch.no_grad():
            assert torch.allclose(lm.model(**batch).logits, ref, atol=1e-6), type(given)
    with pytest.raises(VectorError, match="layer="):
        with ss.steering(lm, vec[2], alpha=0.7):
            pass
    with pytest.raises(VectorError, match="layer=5 is not in this vector"):
        with ss.steering(lm, vec, alpha=0.7, layer=5):
            pass
    with pytest.raises(VectorError, match="1-D"):
        with ss.steering(lm, torch.ones(2, lm.d_model), alpha=0.7, layer=2):
            pass
    r = torch.randn(lm.d_model)  # ablation takes the same forms (its coercion is shared)
    with ss.ablation(lm, r), torch.no_grad():
        ablated = lm.model(**batch).logits
    with ss.ablation(lm, ss.SteeringVector({1: r}).save(tmp_path / "r.safetensors")), torch.no_grad():
        assert torch.allclose(lm.model(**batch).logits, ablated, atol=1e-6)


def test_ablation_and_clamping_refuse_a_zero_vector_before_any_hook(lm):
    zero = ss.SteeringVector({1: torch.zeros(lm.d_model)})
    for ctx in (lambda: ss.ablation(lm, zero), lambda: ss.ablation(lm, torch.zeros(lm.d_model)),
                lambda: ss.clamping(lm, zero, 1.0)):
        with pytest.raises(VectorError, match="non-zero"):
            with ctx():
                pass
        assert hook_count(lm.model) == 0
