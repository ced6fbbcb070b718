"""Receiver gradients of EAP-IG: one probed forward/backward over many path points (rows = points x samples).

Algorithm:
  1. Rows r = point * batch + sample enter block l with resid_pre[l] + alpha_r s, and run the
     model's own blocks (:func:`._suffix.run_blocks`). Zero probes are added to every q/k/v
     projection output and every MLP input; m is backpropagated once for all rows.
  2. Each probe's gradient is pulled back to the residual copy its receiver reads, through the
     receiver's projection (q/k/v) and its input norm (:mod:`._vjp`, exact), optionally summed
     over the points. The logits receiver's gradient is the autograd gradient at the stream
     leaving the last block (it flows through the final norm and any logit soft-capping).
  3. For families with post-sublayer norms the pre-norm sums A of every sublayer are kept per
     row (``A{l}`` attention, ``M{l}`` MLP) so that the caller can apply dP/dA per row.

Cited: Hanna et al. 2024 (EAP-IG); Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Formulas".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from steerscope.circuits._suffix import HookMap, Prefix, logit_diff, run_blocks
from steerscope.circuits._vjp import norm_vjp_sum, rms_of, rms_proj_vjp_sum
from steerscope.circuits.batch import PatchBatch
from steerscope.circuits.graph import Graph
from steerscope.circuits.nodes import mlp_stream
from steerscope.circuits.weights import (
    Proj,
    attn_write_sum,
    has_post_norms,
    input_norm,
    mlp_write,
    n_proj_heads,
    proj_bias,
    proj_weight,
)
from steerscope.hooks import Call, HookFn, attached
from steerscope.models.lm import LM

_QKV: tuple[Proj, Proj, Proj] = ("q", "k", "v")


@dataclass
class Probes:
    """One probed pass: probe gradients ``g`` and recorded inputs ``xs`` by key, m [k batch].

    Keys: ``q{l}``/``k{l}``/``v{l}`` [rows pos n d_head] (the projection outputs), ``m{l}``
    [rows pos d_model] (the MLP input), ``pre{l}``/``mid{l}`` (the streams the receivers' norms
    read), ``final`` (gradient at the stream leaving the last block); ``A{l}``/``M{l}`` pre-norm
    sublayer sums (post-norm families only).
    """

    k: int
    g: dict[str, torch.Tensor]
    xs: dict[str, torch.Tensor]
    m: torch.Tensor


def _hooks(lm: LM, layer0: int, probes: dict[str, torch.Tensor], xs: dict[str, torch.Tensor]) -> HookMap:
    def probe(key: str) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
            xs[key] = x.detach()  # the receiver's own output (q/k/v projection or normed MLP input)
            probes[key] = torch.zeros_like(x, requires_grad=True)
            return x + probes[key]
        return fn

    def keep(key: str) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> None:
            xs[key] = x.detach()
        return fn

    normed = has_post_norms(lm)
    hooks: HookMap = {}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.resid_pre"] = keep(f"pre{layer}")
        hooks[f"blocks.{layer}.resid_mid"] = keep(f"mid{layer}")
        for which in _QKV:
            hooks[f"blocks.{layer}.attn.{which}"] = probe(f"{which}{layer}")
        hooks[f"blocks.{layer}.mlp_in"] = probe(f"m{layer}")
        if normed:
            hooks[f"blocks.{layer}.attn.z"] = keep(f"z{layer}")
    return hooks


def probe_pass(lm: LM, pb: PatchBatch, pre: Prefix, s: torch.Tensor, alphas: Sequence[float]) -> Probes:
    """Probe gradients at the path points ``alphas``, all in one forward/backward.

    Example:
        >>> pr = probe_pass(lm, pb, prefix(lm, pb.inputs(), 12), s, [0.05, 0.15])
    """
    k, (b, _p) = len(alphas), pb.ids.shape
    dev = pre.resid.device
    rows = torch.arange(b, device=dev).repeat(k)  # row = point * b + sample
    a = torch.tensor(list(alphas), dtype=torch.float32).repeat_interleave(b)
    hidden = pre.resid[rows] + (a[:, None] * s.float()[None]).to(dev, lm.dtype)[:, None]
    probes: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), attached(lm, _hooks(lm, pre.layer, probes, xs)):
        resid, rows = run_blocks(lm, pre, hidden, rows)
        m = logit_diff(lm, resid, rows, pb.y_steer, pb.y_base, pb.mask)
        keys = list(probes)
        gs = torch.autograd.grad(m.sum(), [probes[key] for key in keys] + [resid], allow_unused=True)
    g = {key: (torch.zeros_like(probes[key]) if v is None else v) for key, v in zip(keys, gs[:-1])}
    g["final"] = torch.zeros_like(resid) if gs[-1] is None else gs[-1]
    if has_post_norms(lm):
        with torch.no_grad():
            for layer in range(pre.layer, lm.n_layers):
                xs[f"A{layer}"] = attn_write_sum(lm, layer, xs.pop(f"z{layer}"))
                xs[f"M{layer}"] = mlp_write(lm, layer, xs[f"m{layer}"])
    return Probes(k, g, xs, m.detach().view(k, b))


def _qkv_grads(lm: LM, pr: Probes, layer: int, k: int) -> torch.Tensor:
    """Residual-space gradients of block ``layer``'s q, k, v receivers [rows/k pos H+2Hk d_model]."""
    gq = torch.cat([pr.g[f"{w}{layer}"] for w in _QKV], 2)  # [R pos n d_head]
    W = torch.cat([proj_weight(lm, layer, w) for w in _QKV])  # [n d_head d_model], n = H + 2 Hk
    norm, gamma = input_norm(lm, layer, "attn")
    rms = rms_of(norm, gamma)
    if rms is not None:  # factored: never forms the [R pos n d_model] cotangents
        proj = []
        for w in _QKV:
            bias = proj_bias(lm, layer, w)
            proj.append(pr.xs[f"{w}{layer}"] - (0.0 if bias is None else bias))
        return rms_proj_vjp_sum(pr.xs[f"pre{layer}"], gq, torch.cat(proj, 2), W, rms[0], rms[1], k)
    cot = torch.einsum("bphe,hed->bphd", gq, W)
    return norm_vjp_sum(norm, gamma, pr.xs[f"pre{layer}"], cot, k)


def block_grads(lm: LM, pr: Probes, graph: Graph, k: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(receiver columns, residual-space gradients [rows/k pos n d_model]) per receiver block, in order.

    Args:
        k: sum over this many row groups (``pr.k``: over the points; 1: one row per point and sample).
    """
    for layer in range(graph.layer0, graph.n_layers):
        cols = [c for kind in _QKV for c in graph.receiver_columns(layer, kind)]
        if sum(n_proj_heads(lm, w) for w in _QKV) != len(cols):
            raise ValueError("the graph's receivers do not match the model's heads")
        yield cols, _qkv_grads(lm, pr, layer, k)
        gm = pr.g[f"m{layer}"][:, :, None]
        yield graph.receiver_columns(layer, "mlp"), norm_vjp_sum(
            *input_norm(lm, layer, "mlp"), pr.xs[f"{mlp_stream(lm)}{layer}"], gm, k)
    gl = pr.g["final"]
    yield graph.receiver_columns(graph.n_layers, "logits"), gl.view(k, -1, *gl.shape[1:]).sum(0)[:, :, None]
