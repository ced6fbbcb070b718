"""The q/k/v layout and the LM's per-head weight accessors against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import FAMILY_NAMES, batch_ids, make_tiny
from steerscope.models.layout import QKVLayout


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def lm(request):
    return make_tiny(request.param)


def _record(lm, layer: int):
    sites = [f"blocks.{layer}.{p}" for p in ("attn.q", "attn.k", "attn.v", "attn.z", "resid_pre")]
    with ss.recording(lm, sites) as c, torch.no_grad():
        lm.model(**batch_ids())
    x = lm.norm(layer, "input")(c[f"blocks.{layer}.resid_pre"])  # normed input of attention [b p d]
    return c, x


def _apply(x, W, b):
    out = torch.einsum("bpm,hmd->bphd", x, W)
    return out if b is None else out + b


@pytest.mark.parametrize("layer", [0, 2])
def test_per_head_q_k_v_weights_reproduce_the_recorded_projections(lm, layer):
    c, x = _record(lm, layer)
    kw = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_apply(x, lm.W_Q(layer), lm.b_Q(layer)), c[f"blocks.{layer}.attn.q"], **kw)
    for which, W, b in (("k", lm.W_K, lm.b_K), ("v", lm.W_V, lm.b_V)):
        rec = c[f"blocks.{layer}.attn.{which}"]  # [batch pos kv_head d_head]
        torch.testing.assert_close(_apply(x, W(layer, repeat=False), b(layer, repeat=False)), rec, **kw)
        rep = lm.n_heads // rec.shape[2]
        torch.testing.assert_close(_apply(x, W(layer), b(layer)), rec.repeat_interleave(rep, dim=2), **kw)
    assert lm.W_Q(layer).shape == (lm.n_heads, lm.d_model, lm.d_head)
    assert lm.W_K(layer).shape == (lm.n_heads, lm.d_model, lm.d_head)
    assert lm.W_K(layer, repeat=False).shape == (lm.layout.n_kv_heads, lm.d_model, lm.d_head)


def test_per_head_output_weights_and_bias_reproduce_the_output_projection(lm):
    c, _ = _record(lm, 1)
    z = c["blocks.1.attn.z"]  # [batch pos head d_head]
    with torch.no_grad():
        ref = lm.proj(1, "o")(z.flatten(2))
    per_head = torch.einsum("bphd,hdm->bphm", z, lm.W_O(1)).sum(2)
    b = lm.b_O(1)
    torch.testing.assert_close(per_head + (0 if b is None else b), ref, rtol=1e-4, atol=1e-5)
    assert lm.W_O(1).shape == (lm.n_heads, lm.d_head, lm.d_model)


def test_norm_accessors_and_gamma_is_the_effective_scale(lm):
    fam = lm.family
    assert lm.norm(1, "input") is lm.module(1, fam.input_norm)
    assert lm.norm(1, "pre_mlp") is lm.module(1, fam.pre_mlp_norm)
    assert (lm.norm(1, "post_attn") is None) == (fam.post_attn_norm is None)
    norm = lm.norm(1, "input")
    x = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = norm(x)
    if isinstance(norm, torch.nn.LayerNorm):  # GPT-2, NeoX: (x - mean) / std * gamma + beta
        want = torch.nn.functional.layer_norm(x, (lm.d_model,), eps=norm.eps) * lm.gamma(1, "input") + norm.bias
    else:  # RMSNorm (Gemma: (1 + w))
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        want = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * lm.gamma(1, "input")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert lm.final_norm is lm.module(None, fam.final_norm)
    assert lm.W_U().shape == (lm.model.config.vocab_size, lm.d_model)


@pytest.mark.parametrize("kind,heads,kv", [("separate", 4, 2), ("separate", 4, 4), ("fused_gpt2", 4, 4),
                                          ("fused_neox", 4, 4)])
def test_split_merge_and_weight_agree_with_a_plain_matmul(kind, heads, kv):
    dh, d = 8, 16
    lay = QKVLayout(kind, heads, kv, dh, d, o_conv1d=kind == "fused_gpt2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, d, generator=g)
    if kind == "separate":
        for which in "qkv":
            W = torch.randn(lay.heads(which) * dh, d, generator=g)  # Linear [out in]
            out = x @ W.T
            torch.testing.assert_close(lay.split(out, which), torch.einsum("bpm,hmd->bphd", x, lay.weight(W, which)))
            assert torch.equal(lay.merge(out, which, lay.split(out, which)), out)
        return
    W = torch.randn(d, 3 * heads * dh, generator=g) if kind == "fused_gpt2" else torch.randn(3 * heads * dh, d, generator=g)
    out = x @ W if kind == "fused_gpt2" else x @ W.T
    for which in "qkv":
        part = lay.split(out, which)
        torch.testing.assert_close(part, torch.einsum("bpm,hmd->bphd", x, lay.weight(W, which)))
        new = lay.merge(out, which, torch.zeros_like(part))
        assert torch.equal(lay.split(new, which), torch.zeros_like(part))
        for other in set("qkv") - {which}:  # the other parts are untouched
            assert torch.equal(lay.split(new, other), lay.split(out, other))
    assert lay.kv_head(3) == 3 // lay.group
