"""Closed-form norm vector-Jacobian products against autograd."""

from __future__ import annotations

import torch

from conftest import make_tiny
from steerscope.circuits._vjp import norm_vjp, rms_params, rms_proj_vjp_sum, rms_vjp_sum


def _norm(d: int = 32):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(d, generator=torch.Generator().manual_seed(0)))
    return norm


def test_rms_vjp_summed_over_groups_equals_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    k, b, p, n, d = 3, 2, 5, 4, 32
    norm = _norm(d)
    x, cot = torch.randn(k * b, p, d, generator=g) * 2, torch.randn(k * b, p, n, d, generator=g)
    ref = norm_vjp(norm, x, cot).view(k, b, p, n, d).sum(0)
    assert torch.allclose(rms_vjp_sum(x, cot, norm.weight.detach(), 1e-5, k), ref, atol=1e-5)


def test_factored_projection_vjp_equals_autograd_through_norm_and_projection() -> None:
    g = torch.Generator().manual_seed(2)
    k, b, p, n, e, d = 2, 3, 4, 5, 8, 32
    norm = _norm(d)
    W = torch.randn(n, e, d, generator=g) * 0.2
    x, gq = torch.randn(k * b, p, d, generator=g) * 2, torch.randn(k * b, p, n, e, generator=g)
    proj = torch.einsum("rpd,ned->rpne", norm(x), W).detach()  # the projections, bias removed
    cot = torch.einsum("rpne,ned->rpnd", gq, W)  # pulled back through the projection
    ref = norm_vjp(norm, x, cot).view(k, b, p, n, d).sum(0)
    out = rms_proj_vjp_sum(x, gq, proj, W, norm.weight.detach(), 1e-5, k)
    assert torch.allclose(out, ref, atol=1e-5)


def test_rms_params_accepts_rms_norms_and_refuses_layer_norm() -> None:
    for family, ok in (("llama", True), ("gemma", True), ("gpt2", False)):
        lm = make_tiny(family)
        path = lm.family.input_norm
        assert (rms_params(lm, 0, path) is not None) == ok, family
