"""Circuits of a steering vector: edge-level patching and faithfulness (paper A, §4).

Algorithm:
  1. Edge-level patching (:func:`patched_metric`): run the steered model; every receiver v
     (a head's q input, a kv head's k or v input, an MLP input, the logits) reads
     resid_v - sum over the dropped edges u -> v of u's change, where u's change is
     delta_u = u_run - u_corrupt (u_run: u's write in this same run, u_corrupt: in the
     unsteered run). Where a post-sublayer norm P acts on the sum A of a sublayer's writes
     (Gemma 2/3), the dropped nodes D of that sublayer remove P(A) - P(A - D) instead. The
     receiver's own norm and projection are then applied to that input. Keeping every edge
     gives the steered run; keeping none gives the unsteered run exactly.
  2. Circuit of size n (:func:`steerscope.circuits.graph.greedy_circuit`): the n edges of largest
     |EAP-IG score|, pruned to edges on a path from the steering node s to the logits.
  3. Faithfulness (:func:`faithfulness_of`) = (m(C) - m(empty)) / (m(full) - m(empty)), edges
     outside C set to their base (unsteered) activations. The minimal faithful circuit is the
     smallest n whose pruned circuit reaches >= 0.85.
  4. Overlap |C1 ∩ C2| / min(|C1|, |C2|) (:func:`steerscope.circuits.graph.overlap`); controls:
     another method's circuit (swapped) and random circuits of twice the size.

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524); Hanna et al. 2024 (EAP-IG circuits).
This is exact edge-level patching (not a node-level approximation): one forward per circuit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from steerscope.circuits._suffix import HookMap
from steerscope.circuits.batch import PatchBatch, forward, metric
from steerscope.circuits.exact import node_effects
from steerscope.circuits.graph import Graph, greedy_circuit
from steerscope.circuits.nodes import head_outputs, mlp_stream, node_values, normed_change
from steerscope.circuits.weights import Proj, attn_write_sum, input_norm, mlp_write, post_norm, proj_bias, proj_weight
from steerscope.hooks import Call, HookFn, attached
from steerscope.models.lm import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector


class _Live:
    """Node writes of the run in progress, in graph order, and each normed sublayer's (rows, P, A).

    Each node's change delta_u = u_run - u_corrupt is stored once, when u writes, in a U-major
    buffer [U batch pos d_model], so a receiver's removed change is one matrix product over the
    senders so far (no copy of the writes per receiver).
    """

    def __init__(self, corr: torch.Tensor, drop: torch.Tensor, first: torch.Tensor) -> None:
        self.corr = corr  # [batch pos U d_model]
        self.drop = drop  # [U V] 1 where an edge is dropped
        self.live_cols = drop.bool().any(0).cpu()  # [V] receivers with a dropped edge (no device sync per hook)
        b, p, u, d = corr.shape
        self.delta = torch.empty(u, b, p, d, dtype=corr.dtype, device=corr.device)
        self.n = 0  # nodes written so far
        self.normed: list[int] = []
        self.sums: list[tuple[list[int], torch.nn.Module, torch.Tensor]] = []
        self.add(first)

    def add(self, chunk: torch.Tensor, norm: torch.nn.Module | None = None, total: torch.Tensor | None = None) -> None:
        """Record ``chunk`` [batch pos n d_model], the writes of the next n nodes."""
        start, k = self.n, chunk.shape[2]
        self.delta[start:start + k] = (chunk - self.corr[:, :, start:start + k]).permute(2, 0, 1, 3)
        self.n += k
        if norm is not None and total is not None:
            rows = list(range(start, start + k))
            self.sums.append((rows, norm, total))
            self.normed.extend(rows)

    def _apply(self, rows: torch.Tensor | slice, weights: torch.Tensor) -> torch.Tensor:
        """sum_u weights[u, v] delta_u over ``rows``: [batch pos v d_model]."""
        delta = self.delta[rows]
        b, p, d = delta.shape[1:]
        out = weights.t().to(delta.dtype) @ delta.reshape(delta.shape[0], -1)
        return out.view(-1, b, p, d).permute(1, 2, 0, 3)

    def removed(self, cols: list[int]) -> torch.Tensor:
        """[batch pos n d_model]: what the dropped edges into receivers ``cols`` take from the stream."""
        u = self.n
        drop = self.drop[:u, cols]
        if self.normed:
            drop = drop.clone()
            drop[self.normed] = 0
        out = self._apply(slice(0, u), drop)
        for rows, norm, total in self.sums:
            if self.drop[rows][:, cols].any():
                d = self._apply(torch.tensor(rows, device=self.drop.device), self.drop[rows][:, cols])
                out = out + normed_change(norm, total, d)
        return out

    def any(self, cols: list[int]) -> bool:
        return bool(self.live_cols[cols].any())


def _receiver_hooks(lm: LM, graph: Graph, live: _Live, xs: dict[str, torch.Tensor], layer: int) -> HookMap:
    """Hooks on block ``layer`` that give its q/k/v and MLP receivers their patched inputs."""
    anorm, _ = input_norm(lm, layer, "attn")
    pnorm, _ = input_norm(lm, layer, "mlp")

    def qkv(which: Proj) -> HookFn:
        cols = graph.receiver_columns(layer, which)
        W, bias = proj_weight(lm, layer, which), proj_bias(lm, layer, which)

        def fn(x: torch.Tensor, _c: Call) -> torch.Tensor | None:
            if not live.any(cols):
                return None
            normed = anorm(xs[f"pre{layer}"][:, :, None] - live.removed(cols))
            new = torch.einsum("bpnd,ned->bpne", normed, W)
            return new if bias is None else new + bias
        return fn

    mcols = graph.receiver_columns(layer, "mlp")
    stream = mlp_stream(lm)
    mnorm = post_norm(lm, layer, "mlp")

    def mlp(x: torch.Tensor, _c: Call) -> torch.Tensor | None:
        new = None
        if live.any(mcols):
            new = pnorm(xs[f"{stream}{layer}"] - live.removed(mcols)[:, :, 0])
        if mnorm is not None:  # the MLP's pre-norm write, from its actual input
            w = mlp_write(lm, layer, x if new is None else new)
            live.add(w[:, :, None], mnorm, w)
        return new
    return {f"blocks.{layer}.attn.q": qkv("q"), f"blocks.{layer}.attn.k": qkv("k"),
            f"blocks.{layer}.attn.v": qkv("v"), f"blocks.{layer}.mlp_in": mlp}


def _record_hooks(lm: LM, live: _Live, xs: dict[str, torch.Tensor], layer: int) -> HookMap:
    """Hooks on block ``layer`` that keep its input streams and record its nodes' writes."""
    anorm = post_norm(lm, layer, "attn")

    def keep(key: str) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> None:
            xs[key] = x
        return fn

    def rec_z(x: torch.Tensor, _c: Call) -> None:
        live.add(head_outputs(x, lm.W_O(layer)), anorm, None if anorm is None else attn_write_sum(lm, layer, x))

    def rec_mlp(x: torch.Tensor, _c: Call) -> None:
        live.add(x[:, :, None])
    hooks: HookMap = {f"blocks.{layer}.resid_pre": keep(f"pre{layer}"), f"blocks.{layer}.resid_mid": keep(f"mid{layer}"),
             f"blocks.{layer}.attn.z": rec_z}
    if post_norm(lm, layer, "mlp") is None:
        hooks[f"blocks.{layer}.mlp_out"] = rec_mlp
    return hooks


@torch.no_grad()
def patched_metric(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                   keep: torch.Tensor, corrupt: torch.Tensor | None = None) -> torch.Tensor:
    """Metric m per sample [batch] of the steered run with only the edges in ``keep`` [U V] live.

    Example:
        >>> full = torch.ones_like(graph.valid)
        >>> patched_metric(lm, pb, vec, -1.0, graph, full)  # == the steered metric
    """
    layer0, s = vector.single_layer(purpose="attribution")
    corr = node_values(lm, pb, vector, 0.0) if corrupt is None else corrupt
    b, p = pb.ids.shape
    live = _Live(corr, (graph.valid & ~keep.bool().cpu()).to(corr.device, lm.dtype),
                 (alpha * s).to(corr.device, lm.dtype).expand(b, p, 1, -1))
    xs: dict[str, torch.Tensor] = {}
    lcols = graph.receiver_columns(graph.n_layers, "logits")

    def logits_hook(x: torch.Tensor, _c: Call) -> torch.Tensor | None:
        if not live.any(lcols):
            return None
        h = lm.final_norm(xs["final"] - live.removed(lcols)[:, :, 0])
        # not the module (its own hook would recurse); the model applies any soft-capping after it
        return torch.nn.functional.linear(h, lm.W_U())

    def keep_final(x: torch.Tensor, _c: Call) -> None:
        xs["final"] = x
    hooks: HookMap = {f"blocks.{lm.n_layers - 1}.resid_post": keep_final, "logits": logits_hook}
    for layer in range(layer0, lm.n_layers):
        hooks.update(_record_hooks(lm, live, xs, layer))
        hooks.update(_receiver_hooks(lm, graph, live, xs, layer))
    with ExitStack() as st:
        st.enter_context(steering(lm, vector, alpha))
        st.enter_context(attached(lm, hooks))
        logits = forward(lm, pb)
    return metric(logits, pb)


def node_patching(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                  nodes: Sequence[int] | None = None) -> torch.Tensor:
    """Exact activation patching per upstream node: m(steered) - m(steered, node u <- unsteered),
    averaged over samples. [len(nodes)] (all nodes by default).

    Same as dropping every edge out of u with :func:`patched_metric`, one forward per node, but
    batched: many nodes share a forward that starts at each node's block
    (:func:`steerscope.circuits.exact.node_effects`).
    """
    return node_effects(lm, pb, vector, alpha, graph, None if nodes is None else list(nodes))


@dataclass
class Faithfulness:
    """Faithfulness of circuits of several sizes (edges are counted after pruning)."""

    sizes: list[int]  # requested n (top-n before pruning)
    n_edges: list[int]  # edges after pruning
    values: list[float]
    m_full: float
    m_empty: float

    def minimal(self, threshold: float = 0.85) -> int | None:
        """Pruned size of the smallest circuit with faithfulness >= threshold (None if none)."""
        for n, f in zip(self.n_edges, self.values):
            if f >= threshold:
                return n
        return None


def patched_per_prompt(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                       circuits: Sequence[torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """m per sample with only each circuit's edges patched: [2 + len(circuits), n] float64, rows
    (full graph, empty graph, *circuits).

    Example:
        >>> m = patched_per_prompt(lm, pb, vec, 4.0, graph, [circ])  # (m[2] - m[1]) / (m[0] - m[1])
    """
    n = pb.ids.shape[0]
    full, empty = torch.ones_like(graph.valid), torch.zeros_like(graph.valid)
    out = torch.zeros(len(circuits) + 2, n, dtype=torch.float64)
    for i in range(0, n, batch_size):
        sub = pb.rows(slice(i, i + batch_size))
        corr = node_values(lm, sub, vector, 0.0)
        for j, c in enumerate([full, empty, *circuits]):
            out[j, i:i + batch_size] = patched_metric(lm, sub, vector, alpha, graph, c, corr).double().cpu()
    return out


def faithfulness_of(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                    circuits: Sequence[torch.Tensor], batch_size: int = 8) -> tuple[list[float], float, float]:
    """(faithfulness per circuit, m(full), m(empty)) averaged over samples."""
    tot = patched_per_prompt(lm, pb, vector, alpha, graph, circuits, batch_size).mean(1)
    mf, me = float(tot[0]), float(tot[1])
    den = mf - me if abs(mf - me) > 1e-9 else float("nan")
    return [float((t - me) / den) for t in tot[2:]], mf, me


def faithfulness_curve(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, scores: torch.Tensor,
                       graph: Graph, sizes: Sequence[int], batch_size: int = 8) -> Faithfulness:
    """Faithfulness of greedy circuits of each requested size.

    Example:
        >>> fc = faithfulness_curve(lm, pb, vec, -1.0, att.edges, att.graph, [50, 100, 200])
        >>> fc.minimal(0.85)
    """
    circuits = [greedy_circuit(scores, graph, n) for n in sizes]
    vals, mf, me = faithfulness_of(lm, pb, vector, alpha, graph, circuits, batch_size)
    return Faithfulness(list(sizes), [int(c.sum()) for c in circuits], vals, mf, me)
