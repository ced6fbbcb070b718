"""Every family's architecture view against the model's own computations."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import FAMILY_NAMES, batch_ids, make_tiny
from steerscope.hooks import hook_count


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def lm(request):
    return make_tiny(request.param)


def test_recorded_residual_sites_equal_output_hidden_states(lm):
    batch = batch_ids()
    with torch.no_grad():
        hs = lm.model(**batch, output_hidden_states=True).hidden_states
    sites = [f"blocks.{l}.resid_pre" for l in range(lm.n_layers)] + [
        f"blocks.{l}.resid_post" for l in range(lm.n_layers - 1)]
    with ss.recording(lm, sites) as cache, torch.no_grad():
        lm.model(**batch)
    for l in range(lm.n_layers):
        torch.testing.assert_close(cache[f"blocks.{l}.resid_pre"], hs[l], rtol=0, atol=0)
    for l in range(lm.n_layers - 1):
        torch.testing.assert_close(cache[f"blocks.{l}.resid_post"], hs[l + 1], rtol=0, atol=0)


def test_resid_pre_plus_attn_and_mlp_outputs_make_resid_post(lm):
    batch = batch_ids()
    sites = [f"blocks.1.{p}" for p in ("resid_pre", "attn_out", "mlp_out", "resid_post", "resid_mid")]
    with ss.recording(lm, sites) as c, torch.no_grad():
        lm.model(**batch)
    pre, a, m, post = (c[f"blocks.1.{p}"] for p in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
    torch.testing.assert_close(pre + a + m, post, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c["blocks.1.resid_mid"], pre + a, rtol=1e-5, atol=1e-5)


def test_per_head_outputs_sum_to_attention_output(lm):
    if lm.family.post_attn_norm:
        pytest.skip("Gemma 2/3 normalise the summed heads; the pre-norm sum is tested via o_proj below")
    batch = batch_ids()
    with ss.recording(lm, ["blocks.2.attn.z", "blocks.2.attn_out"]) as c, torch.no_grad():
        lm.model(**batch)
    z = c["blocks.2.attn.z"]  # [batch pos head d_head]
    per_head = torch.einsum("bphd,hdm->bphm", z, lm.W_O(2))
    bias = getattr(lm.module(2, lm.family.o_proj), "bias", None)
    total = per_head.sum(2) + (bias if bias is not None else 0)
    torch.testing.assert_close(total, c["blocks.2.attn_out"], rtol=1e-4, atol=1e-5)


def test_per_head_outputs_sum_to_o_proj_output_with_post_norm(lm):
    batch = batch_ids()
    with ss.recording(lm, ["blocks.2.attn.z"]) as c, torch.no_grad():
        lm.model(**batch)
    z = c["blocks.2.attn.z"]
    o = lm.module(2, lm.family.o_proj)
    ref = o(z.flatten(2))
    per_head = torch.einsum("bphd,hdm->bphm", z, lm.W_O(2)).sum(2)
    if getattr(o, "bias", None) is not None:
        per_head = per_head + o.bias
    torch.testing.assert_close(per_head, ref, rtol=1e-4, atol=1e-5)


def test_value_weights_reproduce_recorded_values(lm):
    """W_V per head (GQA-repeated) applied to the normed input gives the recorded attn.v."""
    batch = batch_ids()
    with ss.recording(lm, ["blocks.1.attn.v"]) as c, torch.no_grad():
        hs = lm.model(**batch, output_hidden_states=True).hidden_states
    x = lm.module(1, lm.family.input_norm)(hs[1])
    v = torch.einsum("bpm,hmd->bphd", x, lm.W_V(1))
    b = lm.b_V(1)
    if b is not None:
        v = v + b
    rec = c["blocks.1.attn.v"]
    rep = lm.n_heads // rec.shape[2]
    torch.testing.assert_close(v, rec.repeat_interleave(rep, dim=2), rtol=1e-4, atol=1e-5)


def test_recording_attention_probabilities_does_not_change_logits(lm):
    batch = batch_ids(left_pad=2)
    real = batch["attention_mask"].bool()
    before = hook_count(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch).logits
    with ss.recording(lm, [f"blocks.{l}.attn.pattern" for l in range(lm.n_layers)]) as c, torch.no_grad():
        out = lm.model(**batch).logits
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
    p = c["blocks.0.attn.pattern"]  # [batch head query key]
    assert p.shape == (2, lm.n_heads, 7, 7)
    torch.testing.assert_close(p[1].sum(-1), torch.ones(lm.n_heads, 7), rtol=1e-5, atol=1e-5)
    assert hook_count(lm.model) == before
    assert lm.model.config._attn_implementation != "steerscope"


def test_replacing_patterns_with_recorded_ones_is_identity(lm):
    batch = batch_ids()
    with ss.recording(lm, ["blocks.1.attn.pattern"]) as c, torch.no_grad():
        ref = lm.model(**batch).logits
    with ss.patching(lm, {"blocks.1.attn.pattern": c["blocks.1.attn.pattern"]}), torch.no_grad():
        out = lm.model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_uniform_pattern_changes_logits(lm):
    batch = batch_ids()
    with torch.no_grad():
        ref = lm.model(**batch).logits

    def uniform(p, _c):
        causal = (p > 0).float()
        return causal / causal.sum(-1, keepdim=True)

    with ss.attached(lm, {"blocks.0.attn.pattern": uniform}), torch.no_grad():
        out = lm.model(**batch).logits
    assert (out - ref).abs().max() > 1e-4


def test_the_lm_repr_is_one_line_of_facts(lm):
    text = repr(lm)
    assert "\n" not in text and len(text) < 200
    assert text == (f"LM(name={lm.name!r}, family={lm.model.config.model_type!r}, n_layers={lm.n_layers}, "
                    f"d_model={lm.d_model}, dtype=float32, device=cpu)")
