"""Exact activation patching of every single edge (or node) of the graph, batched (paper A, §4).

Algorithm:
  1. The effect of edge u -> v is m(steered) - m(steered, u -> v dropped), where dropping means
     that receiver v reads resid_v - e_u and everything else runs as usual (the semantics of
     :func:`steerscope.circuits.faithfulness.patched_metric`, one edge at a time). e_u is what u's
     change delta_u = u_steered - u_unsteered adds to the stream: delta_u itself, or, where a
     post-sublayer norm P acts on the sublayer's sum A (Gemma 2/3), P(A) - P(A - delta_u)
     (:func:`steerscope.circuits.nodes.removal`; exact, since below v nothing changes).
  2. Dropping u -> v changes nothing below v's block L_v, and u's own output there is the steered
     one. So one unsteered forward (which also gives the shared prefix below the steering layer,
     :mod:`steerscope.circuits._suffix`) and one steered run from the steering layer up are computed once,
     caching the steered residual stream entering every block and after every attention, and
     e_u for every node (:func:`steered_run`).
  3. Each (edge, sample) is one row. Rows are sorted by L_v and cut into passes of at most
     ``tokens_per_pass`` row-positions. A pass starts at its lowest L_v, and a row joins the batch
     just before its own block, from the cached stream: no row computes a block below L_v.
     In block L_v, hooks replace the row's receiver input: a head's q (or a kv head's k, v)
     becomes W_h norm(resid_pre - e_u) (+ bias), the MLP input norm(resid_mid - e_u) (with a
     parallel residual: norm(resid_pre - e_u)); a logits receiver reads the final stream minus e_u.
  4. m per row from the final stream at the scored positions (:func:`steerscope.circuits._suffix.logit_diff`);
     effect = m(steered) - m(row), averaged over samples.
  Node patching (every edge out of u dropped) is the same with e_u subtracted from the
  residual stream itself right after u writes: resid_mid of u's block (a head), the stream
  entering the next block (an MLP, or the final stream), the stream entering block l (s).

Cost: one row per (edge, sample), through the blocks from its receiver's up only; rows of many
edges share each forward. Tested against :func:`steerscope.circuits.faithfulness.patched_metric`
edge by edge, for Llama-like and Gemma 2/3 models.
Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), §4 (activation patching as the reference
for EAP-IG); Hanna et al. 2024, "Have faith in faithfulness".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerscope.circuits._suffix import HookMap, Prefix, logit_diff, prefix, run_blocks
from steerscope.circuits.batch import PatchBatch, scored_batches, trim
from steerscope.circuits.eap_ig import check_supported
from steerscope.circuits.graph import Graph
from steerscope.circuits.nodes import assemble, mlp_stream, model_graph, node_hooks, removal, suffix_run
from steerscope.circuits.weights import Proj, input_norm, proj_bias, proj_weight
from steerscope.errors import SteerscopeError
from steerscope.hooks import Call, HookFn, attached
from steerscope.models.lm import LM
from steerscope.progress import progress
from steerscope.vector import SteeringVector

POINTS = ("pre", "q", "k", "v", "mid", "mlp")  # where a row's delta is removed (see the module docstring)
_PRE, _Q, _K, _V, _MID, _MLP = range(len(POINTS))


@dataclass
class PatchRows:
    """One patched run per row. All fields long [rows].

    ``layer`` is the block whose input first changes (n_layers: the final stream); ``point`` indexes
    :data:`POINTS`; ``head`` is the head (q) or kv head (k, v); ``node`` the upstream node u whose
    delta is removed; ``sample`` the sample of the batch; ``key`` what the row measures (an edge's
    flat index into [U V], or a node's index).
    """

    sample: torch.Tensor
    layer: torch.Tensor
    point: torch.Tensor
    head: torch.Tensor
    node: torch.Tensor
    key: torch.Tensor

    def __len__(self) -> int:
        return len(self.sample)

    def take(self, idx: torch.Tensor) -> PatchRows:
        return PatchRows(*(getattr(self, f)[idx] for f in ("sample", "layer", "point", "head", "node", "key")))

    @staticmethod
    def build(specs: list[tuple[int, int, int, int, int]], n_samples: int) -> PatchRows:
        """Rows for ``(layer, point, head, node, key)`` specs, one per spec and sample."""
        t = torch.tensor(specs, dtype=torch.long).view(-1, 5)
        cols = [t[:, c].repeat_interleave(n_samples) for c in range(5)]
        sample = torch.arange(n_samples).repeat(len(t))
        return PatchRows(sample, *cols)


_RECEIVER_POINT = {"q": _Q, "k": _K, "v": _V, "mlp": _MLP, "logits": _PRE}


def receiver_site(graph: Graph, j: int) -> tuple[int, int, int]:
    """(layer, point, head) where receiver ``j`` reads its input (the logits: the final stream)."""
    r = graph.receivers[j]
    return r.layer, _RECEIVER_POINT[r.kind], r.head or 0


def node_site(graph: Graph, u: int) -> tuple[int, int]:
    """(layer, point) right after upstream node ``u`` writes into the residual stream."""
    node = graph.upstream[u]
    if node.kind == "steer":
        return node.layer, _PRE
    return (node.layer, _MID) if node.kind == "head" else (node.layer + 1, _PRE)


@dataclass
class SteeredRun:
    """The cached pieces every patched row starts from (one batch of samples).

    ``streams[L]`` [batch pos d_model]: the steered stream entering block L (L = n_layers: leaving
    the last block); ``mids[L]``: after block L's attention; ``delta`` [batch pos U d_model]: e_u,
    what removing u's change takes from the stream (see the module docstring); ``m`` [batch]: the
    steered metric.
    """

    pre: Prefix
    streams: dict[int, torch.Tensor]
    mids: dict[int, torch.Tensor]
    delta: torch.Tensor
    m: torch.Tensor


@torch.no_grad()
def steered_run(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float) -> SteeredRun:
    """One unsteered forward (the prefix and u_unsteered) and one steered run from the steering layer up."""
    layer0, s = vector.single_layer(purpose="attribution")
    outs: dict[str, torch.Tensor] = {}
    pre = prefix(lm, pb.inputs(), layer0, node_hooks(lm, layer0, outs))
    corr = assemble(lm, outs, layer0, 0.0 * s)
    streams: dict[int, torch.Tensor] = {}
    mids: dict[int, torch.Tensor] = {}

    def keep(store: dict[int, torch.Tensor], layer: int) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> None:
            store[layer] = x
        return fn

    last = lm.n_layers
    hooks: HookMap = {f"blocks.{last - 1}.resid_post": keep(streams, last)}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.resid_pre"] = keep(streams, layer)
        hooks[f"blocks.{layer}.resid_mid"] = keep(mids, layer)
    clean, m = suffix_run(lm, pb, pre, alpha * s, hooks)
    graph = model_graph(lm, layer0)
    return SteeredRun(pre, streams, mids, removal(lm, graph, clean, corr), m)


def _qkv_hook(lm: LM, run: SteeredRun, layer: int, rows: PatchRows, off: int, sel: torch.Tensor,
              which: Proj) -> HookFn:
    """Replace the ``which`` projection of the selected rows' patched heads with W_h norm(resid_pre - e_u)."""
    i, u = rows.sample[sel], rows.node[sel]
    W, bias = proj_weight(lm, layer, which), proj_bias(lm, layer, which)  # [n d_head d_model], [n d_head]
    norm, _ = input_norm(lm, layer, "attn")

    def fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
        normed = norm(run.streams[layer][i] - run.delta[i, :, u])
        x = x.clone()
        for h in torch.unique(rows.head[sel]).tolist():
            at = rows.head[sel] == h
            new = normed[at] @ W[h].T
            x[off + sel[at], :, h] = new if bias is None else new + bias[h]
        return x
    return fn


def _layer_hooks(lm: LM, run: SteeredRun, layer: int, rows: PatchRows, off: int) -> HookMap:
    """Hooks on block ``layer`` that patch the receiver inputs of ``rows`` (batch rows off.. in the pass)."""
    hooks: HookMap = {}
    i, u = rows.sample, rows.node
    qkv: tuple[tuple[int, Proj], ...] = ((_Q, "q"), (_K, "k"), (_V, "v"))
    for point, which in qkv:
        sel = (rows.point == point).nonzero()[:, 0]
        if len(sel):
            hooks[f"blocks.{layer}.attn.{which}"] = _qkv_hook(lm, run, layer, rows, off, sel, which)
    mlp = (rows.point == _MLP).nonzero()[:, 0]
    mlp_norm, _ = input_norm(lm, layer, "mlp")
    src = run.streams if mlp_stream(lm) == "pre" else run.mids
    if len(mlp):
        def mlp_fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
            x = x.clone()
            x[off + mlp] = mlp_norm(src[layer][i[mlp]] - run.delta[i[mlp], :, u[mlp]])
            return x
        hooks[f"blocks.{layer}.mlp_in"] = mlp_fn
    mid = (rows.point == _MID).nonzero()[:, 0]
    if len(mid):
        def mid_fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
            x = x.clone()
            x[off + mid] -= run.delta[i[mid], :, u[mid]]
            return x
        hooks[f"blocks.{layer}.resid_mid"] = mid_fn
    return hooks


def _one_pass(lm: LM, pb: PatchBatch, run: SteeredRun, rows: PatchRows) -> torch.Tensor:
    """m [rows] of the patched runs of ``rows`` (sorted by layer) in one pass up the blocks."""
    inserts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks: HookMap = {}
    off = 0
    for layer in torch.unique(rows.layer).tolist():
        r = rows.take((rows.layer == layer).nonzero()[:, 0])
        h = run.streams[layer][r.sample]
        at = r.point == _PRE
        if at.any():
            h[at] -= run.delta[r.sample[at], :, r.node[at]]
        inserts[layer] = (h, r.sample)
        if layer < lm.n_layers:
            hooks.update(_layer_hooks(lm, run, layer, r, off))
        off += len(r)
    first = min(inserts)
    empty = run.streams[first][:0]
    with attached(lm, hooks):
        resid, order = run_blocks(lm, run.pre, empty, rows.sample[:0], start=first, inserts=inserts)
    return logit_diff(lm, resid, order, pb.y_steer, pb.y_base, pb.mask)


@torch.no_grad()
def patch_rows(lm: LM, pb: PatchBatch, run: SteeredRun, rows: PatchRows, tokens_per_pass: int = 16384,
               show_progress: bool = False) -> torch.Tensor:
    """m of every row's patched run [rows], in passes of at most ``tokens_per_pass`` row-positions."""
    order = torch.argsort(rows.layer, stable=True)
    per = max(1, tokens_per_pass // pb.ids.shape[1])
    out = torch.empty(len(rows), dtype=torch.float64)
    for chunk in progress(torch.split(order, per), desc="exact patching", enabled=show_progress):
        out[chunk] = _one_pass(lm, pb, run, rows.take(chunk)).double().cpu()
    return out


def _effects(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float,
             specs: list[tuple[int, int, int, int, int]], size: int, batch_size: int, tokens_per_pass: int,
             show_progress: bool) -> torch.Tensor:
    """Mean over samples of m(steered) - m(row) for each spec key. [size] float32"""
    check_supported(lm)
    vector.single_layer(purpose="attribution")
    total = torch.zeros(size, dtype=torch.float64)
    n = pb.ids.shape[0]
    for idx in scored_batches(pb, batch_size):
        sub = trim(pb.rows(idx))
        run = steered_run(lm, sub, vector, alpha)
        rows = PatchRows.build(specs, sub.ids.shape[0])
        m = patch_rows(lm, sub, run, rows, tokens_per_pass, show_progress)
        total.index_add_(0, rows.key, run.m.double().cpu()[rows.sample] - m)
    return (total / n).float()


def _check_graph(lm: LM, vector: SteeringVector, graph: Graph) -> None:
    layer0, _ = vector.single_layer(purpose="attribution")
    if graph.to_dict() != model_graph(lm, layer0).to_dict():
        raise SteerscopeError(f"the graph starts at layer {graph.layer0} but the vector is at layer {layer0} "
                              "(or the graph is another model's); build it with model_graph(lm, layer) for this model and vector")


def edge_effects(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                 edges: torch.Tensor | None = None, batch_size: int = 1, tokens_per_pass: int = 16384,
                 show_progress: bool = False) -> torch.Tensor:
    """Exact single-edge patching: m(steered) - m(steered, edge u -> v dropped), mean over samples.

    Args:
        graph: from :meth:`steerscope.circuits.graph.Graph.build` for the vector's layer.
        edges: bool [U V] which edges to patch (default: every valid edge).
        batch_size: samples per steered run (1: each sample keeps only its own columns, see
            :func:`steerscope.circuits.batch.trim`); tokens_per_pass: rows x positions per forward.

    Returns:
        [U V] effects, 0 for edges not patched.

    Example:
        >>> exact = edge_effects(lm, pb, vec, -1.0, att.graph)   # every edge, in minutes
        >>> spearmanr(exact[g.valid], att.edges[g.valid])
    """
    _check_graph(lm, vector, graph)
    want = graph.valid if edges is None else edges.bool() & graph.valid
    U, V = graph.valid.shape
    specs = []
    for f in want.flatten().nonzero()[:, 0].tolist():
        layer, point, head = receiver_site(graph, f % V)
        specs.append((layer, point, head, f // V, f))
    return _effects(lm, pb, vector, alpha, specs, U * V, batch_size, tokens_per_pass,
                    show_progress).view(U, V)


def node_effects(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph,
                 nodes: list[int] | None = None, batch_size: int = 1, tokens_per_pass: int = 16384) -> torch.Tensor:
    """Exact node patching (every edge out of u dropped), mean over samples. [len(nodes)] (default all U)."""
    _check_graph(lm, vector, graph)
    idx = list(range(len(graph.upstream))) if nodes is None else list(nodes)
    specs = [(*node_site(graph, u), 0, u, j) for j, u in enumerate(idx)]
    return _effects(lm, pb, vector, alpha, specs, len(idx), batch_size, tokens_per_pass, False)
