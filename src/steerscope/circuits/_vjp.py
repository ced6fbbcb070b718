"""Exact vector-Jacobian products through the norm (and projections) in front of a receiver.

EAP-IG (:mod:`steerscope.circuits.eap_ig`) needs, for each receiver v, the gradient of m with respect
to the residual copy that v alone reads: the gradient at v's own output (a probe) pulled back
through v's linear map and its norm. For an RMS norm y = gamma * x / sqrt(mean(x^2) + eps) the
pull-back has a closed form, applied here to many receivers and many interpolation steps at once
and summed over the steps (:func:`rms_vjp_sum`, :func:`rms_proj_vjp_sum`); any other norm falls
back to autograd (:func:`norm_vjp`). :func:`rms_params` checks a norm module against the closed
form before it is used. Tested against autograd.
"""

from __future__ import annotations

import torch

from steerscope.models.lm import LM


def norm_vjp(norm: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of a norm module at x (exact, by autograd).

    Args:
        x: norm input [batch pos d_model]; g: cotangents [batch pos n d_model] (n receivers).
    Returns:
        [batch pos n d_model] gradients with respect to the norm's input.
    """
    with torch.enable_grad():
        xr = x.detach()[:, :, None].expand_as(g).clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(norm(xr), xr, grad_outputs=g)
    return gx


def rms_vjp_sum(x: torch.Tensor, g: torch.Tensor, gamma: torch.Tensor, eps: float, k: int) -> torch.Tensor:
    """Vector-Jacobian products of y = gamma * x / sqrt(mean(x^2) + eps), summed over k row groups.

    With rho = (mean(x^2) + eps)^-1/2 the product is gamma rho g - x rho^3 (g . gamma x) / d_model.

    Args:
        x: norm inputs [k*batch pos d_model] (row = group * batch + sample).
        g: cotangents [k*batch pos n d_model] (n receivers reading the same norm input).
    Returns:
        [batch pos n d_model]: the gradients with respect to the norm input, summed over the k groups.
    """
    R, p, n, d = g.shape
    xf = x.float()
    rho = (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # [R pos 1]
    c = torch.einsum("rpnd,rpd->rpn", g.float(), gamma * xf * rho.pow(3) / d)
    t1 = (g.float().view(k, R // k, p, n, d) * (gamma * rho).view(k, R // k, p, 1, d)).sum(0)
    t2 = torch.einsum("kbpd,kbpn->bpnd", xf.view(k, R // k, p, d), c.view(k, R // k, p, n))
    return (t1 - t2).to(g.dtype)


def rms_proj_vjp_sum(x: torch.Tensor, gq: torch.Tensor, proj: torch.Tensor, W: torch.Tensor, gamma: torch.Tensor,
                     eps: float, k: int) -> torch.Tensor:
    """:func:`rms_vjp_sum` through per-head projections y_n = W_n rmsnorm(x) (+ bias), factored.

    With rho = (mean(x^2) + eps)^-1/2 the gradient of receiver n is
    gamma * W_n^T (rho gq_n) - x (rho^2 / d_model) (gq_n . (y_n - bias_n)), so only the sum over
    groups of rho gq [batch pos n d_head] meets W; no [k*batch pos n d_model] tensor is formed.

    Args:
        x: norm inputs [k*batch pos d_model]; gq: cotangents of the projections [k*batch pos n d_head];
        proj: the projections without bias [k*batch pos n d_head]; W: [n d_head d_model].
    Returns:
        [batch pos n d_model], summed over the k groups.
    """
    R, p, n, e = gq.shape
    b, d = R // k, x.shape[-1]
    xf, gf = x.float(), gq.float()
    rho = (xf.pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # [R pos 1]
    G = (gf * rho[..., None]).view(k, b, p, n, e).sum(0)
    t1 = torch.einsum("bpne,ned->bpnd", G, W.float()) * gamma
    c = (gf * proj.float()).sum(-1) * rho.pow(2) / d  # [R pos n]
    t2 = torch.einsum("kbpd,kbpn->bpnd", xf.view(k, b, p, d), c.view(k, b, p, n))
    return (t1 - t2).to(gq.dtype)


def rms_of(norm: torch.nn.Module, gamma: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """(gamma, eps) when ``norm`` is exactly gamma * x / sqrt(mean(x^2) + eps) (checked), else None.

    Args:
        gamma: the norm's effective scale [d_model] (Gemma's 1 + w included), on the norm's device.
    """
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        return None
    w = next(norm.parameters(), gamma)
    x = torch.randn(4, gamma.shape[-1], generator=torch.Generator().manual_seed(0)).to(gamma.device, w.dtype) * 3
    with torch.no_grad():
        ref = norm(x).float()
    mine = gamma * x.float() * (x.float().pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return (gamma, eps) if torch.allclose(ref, mine, rtol=1e-4, atol=1e-5) else None


def rms_params(lm: LM, layer: int | None, path: str) -> tuple[torch.Tensor, float] | None:
    """:func:`rms_of` for the norm at module ``path`` of block ``layer`` (None: top level)."""
    return rms_of(lm.module(layer, path), lm.norm_weight(layer, path).to(lm.device))


def norm_vjp_sum(norm: torch.nn.Module, gamma: torch.Tensor, x: torch.Tensor, g: torch.Tensor, k: int
                 ) -> torch.Tensor:
    """:func:`rms_vjp_sum` for an RMS norm (``norm`` with scale ``gamma``), else autograd
    (:func:`norm_vjp`) then the sum over k groups. x [k*batch pos d_model]; g [k*batch pos n d_model]."""
    rms = rms_of(norm, gamma)
    if rms is not None:
        return rms_vjp_sum(x, g, rms[0], rms[1], k)
    gx = norm_vjp(norm, x, g)
    return gx.view(k, gx.shape[0] // k, *gx.shape[1:]).sum(0)
