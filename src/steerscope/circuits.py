"""Circuits of a steering vector: edge-level patching, faithfulness, overlap (paper A, §4).

Algorithm:
  1. Edge-level patching (:func:`patched_metric`): run the steered model; every receiver v
     (a head's q input, a kv head's k or v input, an MLP input, the logits) reads
     resid_v - sum_{u -> v not kept} (u_run - u_corrupt), where u_run is node u's output in this
     same run and u_corrupt its output in the unsteered run; the receiver's own norm and
     projection are then applied to that input. Keeping every edge gives the steered run;
     keeping none gives the unsteered run exactly (residual = sum of component outputs).
  2. Circuit of size n (:func:`greedy_circuit`): the n edges of largest |EAP-IG score|, pruned
     to edges that lie on a path from the steering node s to the logits.
  3. Faithfulness (:func:`faithfulness`) = (m(C) - m(empty)) / (m(full) - m(empty)), edges
     outside C set to their base (unsteered) activations. The minimal faithful circuit is the
     smallest n whose pruned circuit reaches >= 0.85.
  4. Overlap |C1 ∩ C2| / min(|C1|, |C2|); controls: another method's circuit (swapped) and
     random circuits of twice the size.

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524); Hanna et al. 2024 (EAP-IG circuits).
This is exact edge-level patching (not a node-level approximation): one forward per circuit.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch

from steerscope.attribution import (
    Graph,
    PatchBatch,
    _rows,
    _single,
    _weight,
    forward,
    head_outputs,
    metric,
    node_values,
)
from steerscope.edge_patching import node_effects
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector


@torch.no_grad()
def patched_metric(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                   keep: torch.Tensor, corrupt: torch.Tensor | None = None) -> torch.Tensor:
    """Metric m per sample [batch] of the steered run with only the edges in ``keep`` [U V] live.

    Example:
        >>> full = torch.ones_like(graph.valid)
        >>> patched_metric(lm, pb, vec, -1.0, graph, full)  # == the steered metric
    """
    layer0, s = _single(vector)
    corr = node_values(lm, pb, vector, 0.0) if corrupt is None else corrupt
    drop = (graph.valid & ~keep.bool()).to(lm.dtype)  # [U V]
    b, p = pb.ids.shape
    H, Hk, dh = lm.n_heads, lm.n_kv_heads, lm.d_head
    run: list[torch.Tensor] = [(alpha * s).to(lm.dtype).expand(b, p, 1, -1)]  # node outputs so far, in order
    xs: dict[str, torch.Tensor] = {}
    fam = lm.family

    def delta(sl: slice) -> torch.Tensor:
        """[batch pos n d_model]: what the dropped edges into receivers ``sl`` must remove."""
        cur = torch.cat(run, 2)
        u = cur.shape[2]
        return torch.einsum("bpud,uv->bpvd", cur - corr[:, :, :u], drop[:u, sl])

    def qkv_hook(layer: int, which: str):
        n = H if which == "q" else Hk
        off = {"q": 0, "k": H, "v": H + Hk}[which]

        def fn(x: torch.Tensor, _c: Call) -> torch.Tensor | None:
            sl = graph.recv_slice(layer)
            sl = slice(sl.start + off, sl.start + off + n)
            if not drop[:, sl].any():
                return None
            xin = xs[f"pre{layer}"][:, :, None] - delta(sl)  # [b p n d]
            normed = lm.module(layer, fam.input_norm)(xin)
            new = torch.einsum("bpnd,ned->bpne", normed, _weight(lm, layer, which, n))
            bias = getattr(lm.module(layer, getattr(fam, f"{which}_proj")), "bias", None)
            return new if bias is None else new + bias.view(n, dh)
        return fn

    def mlp_hook(layer: int):
        def fn(x: torch.Tensor, _c: Call) -> torch.Tensor | None:
            j = graph.recv_slice(layer).stop - 1
            if not drop[:, j].any():
                return None
            return lm.module(layer, fam.pre_mlp_norm)(xs[f"mid{layer}"] - delta(slice(j, j + 1))[:, :, 0])
        return fn

    def logits_hook(x: torch.Tensor, _c: Call) -> torch.Tensor | None:
        j = len(graph.receivers) - 1
        if not drop[:, j].any():
            return None
        h = lm.module(None, fam.final_norm)(xs["final"] - delta(slice(j, j + 1))[:, :, 0])
        return torch.nn.functional.linear(h, lm.W_U())  # not the module: its own hook would recurse

    def keep_x(key: str):
        return lambda x, _c: xs.__setitem__(key, x)

    def rec_z(layer: int):
        return lambda x, _c: run.append(head_outputs(x, lm.W_O(layer)))

    hooks: dict = {}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.resid_pre"] = keep_x(f"pre{layer}")
        hooks[f"blocks.{layer}.resid_mid"] = keep_x(f"mid{layer}")
        hooks[f"blocks.{layer}.attn.q"] = qkv_hook(layer, "q")
        hooks[f"blocks.{layer}.attn.k"] = qkv_hook(layer, "k")
        hooks[f"blocks.{layer}.attn.v"] = qkv_hook(layer, "v")
        hooks[f"blocks.{layer}.attn.z"] = rec_z(layer)
        hooks[f"blocks.{layer}.mlp_in"] = mlp_hook(layer)
        hooks[f"blocks.{layer}.mlp_out"] = lambda x, _c: run.append(x[:, :, None])
    hooks[f"blocks.{lm.n_layers - 1}.resid_post"] = keep_x("final")
    hooks["logits"] = logits_hook
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
    (:func:`steerscope.edge_patching.node_effects`).
    """
    return node_effects(lm, pb, vector, alpha, graph, None if nodes is None else list(nodes))


def prune(keep: torch.Tensor, graph: Graph) -> torch.Tensor:
    """Keep only edges on a path s -> ... -> logits. keep: bool [U V] -> bool [U V].

    Receivers map to upstream nodes (a head's q/k/v input feeds that head; a kv head's inputs
    feed its query group; an MLP input feeds that MLP).
    """
    keep = keep.bool() & graph.valid
    U, V = keep.shape
    feeds = torch.zeros(V, U, dtype=torch.bool)  # receiver -> the upstream node(s) it feeds
    rep = graph.n_heads // graph.n_kv
    for layer in range(graph.layer0, graph.n_layers):
        r, u = graph.recv_slice(layer), graph.up_slice(layer)
        for h in range(graph.n_heads):
            feeds[r.start + h, u.start + h] = True
            feeds[r.start + graph.n_heads + h // rep, u.start + h] = True
            feeds[r.start + graph.n_heads + graph.n_kv + h // rep, u.start + h] = True
        feeds[r.stop - 1, u.stop - 1] = True
    adj = (keep.float() @ feeds.float()) > 0  # u -> u' through any kept receiver of u' [U U]
    fwd = torch.zeros(U, dtype=torch.bool)
    fwd[0] = True
    for _ in range(U):  # reachable from s
        new = fwd | (fwd.float() @ adj.float() > 0)
        if torch.equal(new, fwd):
            break
        fwd = new
    bwd = keep[:, -1].clone()  # reaches the logits
    for _ in range(U):
        new = bwd | ((adj.float() @ bwd.float()) > 0)
        if torch.equal(new, bwd):
            break
        bwd = new
    src_ok = fwd[:, None]
    dst_ok = torch.zeros(V, dtype=torch.bool)
    dst_ok[-1] = True
    dst_ok |= (feeds & bwd[None, :]).any(1)
    return keep & src_ok & dst_ok[None, :]


def greedy_circuit(scores: torch.Tensor, graph: Graph, n: int) -> torch.Tensor:
    """Top-n edges by |score|, pruned to paths from s to the logits. bool [U V]."""
    flat = torch.where(graph.valid, scores.abs(), torch.full_like(scores, -1.0)).flatten()
    n = min(n, graph.n_edges)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(n).indices] = True
    return prune(keep.view_as(scores), graph)


def random_circuit(graph: Graph, n: int, seed: int = 0) -> torch.Tensor:
    """n random valid edges (a control; not pruned). bool [U V]."""
    g = torch.Generator().manual_seed(seed)
    idx = graph.valid.flatten().nonzero()[:, 0]
    pick = idx[torch.randperm(len(idx), generator=g)[: min(n, len(idx))]]
    keep = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    keep[pick] = True
    return keep.view_as(graph.valid)


def overlap(c1: torch.Tensor, c2: torch.Tensor) -> float:
    """|C1 ∩ C2| / min(|C1|, |C2|) of two edge sets (bool [U V])."""
    a, b = int(c1.sum()), int(c2.sum())
    return float((c1 & c2).sum()) / max(min(a, b), 1)


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


def faithfulness_of(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                    circuits: Sequence[torch.Tensor], batch_size: int = 8) -> tuple[list[float], float, float]:
    """(faithfulness per circuit, m(full), m(empty)) averaged over samples."""
    n = pb.ids.shape[0]
    full, empty = torch.ones_like(graph.valid), torch.zeros_like(graph.valid)
    tot = torch.zeros(len(circuits) + 2, dtype=torch.float64)
    for i in range(0, n, batch_size):
        sub = _rows(pb, slice(i, i + batch_size))
        corr = node_values(lm, sub, vector, 0.0)
        for j, c in enumerate([full, empty, *circuits]):
            tot[j] += patched_metric(lm, sub, vector, alpha, graph, c, corr).sum().double()
    tot /= n
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
