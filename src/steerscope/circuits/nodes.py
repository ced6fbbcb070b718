"""What every upstream node writes: recorded in one run, as [batch pos U d_model] in graph order.

A head's write is z_h W_O^h, an MLP's write is its output, both taken BEFORE any post-sublayer
norm (Gemma 2/3); the steering node's write is alpha*s. Where a family normalises a sublayer's
output (y = P(A), A = the sum of the sublayer's writes), removing node u's change delta_u from
the stream removes P(A) - P(A - delta_u), not delta_u itself: :func:`removal` computes that
effect of each node in one run (identity P: the effect is delta_u).
"""

from __future__ import annotations

import torch

from steerscope.circuits._suffix import HookMap, Prefix, logit_diff, run_blocks
from steerscope.circuits.batch import PatchBatch, forward
from steerscope.circuits.graph import Graph
from steerscope.circuits.weights import apply_unhooked, mlp_write, post_norm
from steerscope.hooks import Call, HookFn, attached
from steerscope.models.lm import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector


def model_graph(lm: LM, layer0: int) -> Graph:
    """The attribution graph of ``lm`` from block ``layer0`` up (its heads, kv heads, residual kind)."""
    return Graph.build(layer0, lm.n_layers, lm.n_heads, lm.n_kv_heads, parallel=lm.parallel_residual)


def mlp_stream(lm: LM) -> str:
    """Which cached stream a block's MLP reads: ``"mid"`` (after attention) or ``"pre"`` (parallel residual)."""
    return "pre" if lm.parallel_residual else "mid"


def head_outputs(z: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """Per-head writes: [batch pos head d_head] x [head d_head d_model] -> [batch pos head d_model]."""
    return torch.einsum("bphe,hed->bphd", z, W_O.to(z.dtype))


def node_hooks(lm: LM, layer0: int, outs: dict[str, torch.Tensor]) -> HookMap:
    """Hooks that record each head's z (``z{L}``) and each MLP's pre-norm write (``m{L}``) into ``outs``."""
    hooks: HookMap = {}
    normed_mlp = post_norm(lm, layer0, "mlp") is not None

    def rec(key: str, layer: int | None = None) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> None:
            outs[key] = x.clone() if layer is None else mlp_write(lm, layer, x).detach()
        return fn

    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.attn.z"] = rec(f"z{layer}")
        if normed_mlp:  # the MLP's own output, recomputed from its input (mlp_out is after the norm)
            hooks[f"blocks.{layer}.mlp_in"] = rec(f"m{layer}", layer)
        else:
            hooks[f"blocks.{layer}.mlp_out"] = rec(f"m{layer}")
    return hooks


def assemble(lm: LM, outs: dict[str, torch.Tensor], layer0: int, s_term: torch.Tensor) -> torch.Tensor:
    """Upstream node writes [batch pos U d_model] from :func:`node_hooks` records and alpha*s [d_model]."""
    b, p = outs[f"m{layer0}"].shape[:2]
    parts = [s_term.to(outs[f"m{layer0}"].device, lm.dtype).expand(b, p, 1, -1)]
    for layer in range(layer0, lm.n_layers):
        parts += [head_outputs(outs[f"z{layer}"], lm.W_O(layer)), outs[f"m{layer}"][:, :, None]]
    return torch.cat(parts, 2)


@torch.no_grad()
def node_values(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float) -> torch.Tensor:
    """Upstream node writes of one full run (alpha=0: the corrupt run): [batch pos U d_model]."""
    layer0, s = vector.single_layer(purpose="attribution")
    outs: dict[str, torch.Tensor] = {}
    with steering(lm, vector, alpha), attached(lm, node_hooks(lm, layer0, outs)):
        forward(lm, pb)
    return assemble(lm, outs, layer0, alpha * s)


@torch.no_grad()
def suffix_run(lm: LM, pb: PatchBatch, pre: Prefix, add: torch.Tensor,
               hooks: HookMap | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run whose stream entering block ``pre.layer`` is ``pre.resid + add`` ([d_model]), from there up.

    Returns:
        (node writes [batch pos U d_model] with ``add`` as the first node, m per sample [batch]).
    """
    outs: dict[str, torch.Tensor] = {}
    rows = torch.arange(pre.n_samples, device=pre.resid.device)
    with attached(lm, {**(hooks or {}), **node_hooks(lm, pre.layer, outs)}):
        resid, rows = run_blocks(lm, pre, pre.resid + add.to(pre.resid.device, lm.dtype), rows)
    return assemble(lm, outs, pre.layer, add), logit_diff(lm, resid, rows, pb.y_steer, pb.y_base, pb.mask)


def sublayer_bias(lm: LM, layer: int) -> torch.Tensor | float:
    """The attention output bias (part of the sublayer's pre-norm sum A), or 0."""
    bias = lm.b_O(layer)
    return 0.0 if bias is None else bias


def sublayer_norms(lm: LM, graph: Graph) -> list[tuple[list[int], torch.nn.Module | None, torch.Tensor | float]]:
    """Per sublayer: (its node rows, its post-norm or None, the bias inside its sum), in graph order."""
    out: list[tuple[list[int], torch.nn.Module | None, torch.Tensor | float]] = []
    for layer in range(graph.layer0, graph.n_layers):
        rows = graph.node_rows(layer)
        out.append((rows[:-1], post_norm(lm, layer, "attn"), sublayer_bias(lm, layer)))
        out.append((rows[-1:], post_norm(lm, layer, "mlp"), 0.0))
    return out


def normed_change(norm: torch.nn.Module, total: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """P(A) - P(A - D): what removing D from a sublayer's pre-norm sum A removes from the stream.

    Args:
        total: A [batch pos d_model]; drop: D [batch pos n d_model] (n alternatives).
    Returns:
        [batch pos n d_model].
    """
    a = total[:, :, None]
    return apply_unhooked(norm, a.expand_as(drop)) - apply_unhooked(norm, a - drop)


@torch.no_grad()
def removal(lm: LM, graph: Graph, run: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """What removing each node's change from the stream of ``run`` subtracts there. [batch pos U d_model]

    Node u's change is delta_u = run_u - corrupt_u (writes, [batch pos U d_model]); with a post-norm
    P over the sublayer's sum A = sum of its writes (+ bias) the stream loses P(A) - P(A - delta_u).
    """
    delta = run - corrupt
    out = delta.clone()
    for rows, norm, bias in sublayer_norms(lm, graph):
        if norm is not None:
            total = run[:, :, rows].sum(2) + bias
            out[:, :, rows] = normed_change(norm, total, delta[:, :, rows])
    return out

