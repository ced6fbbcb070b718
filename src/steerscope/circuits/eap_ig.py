"""Multi-token EAP-IG for a steering vector (paper A, §4; Hanna et al. 2024; Syed et al. 2023).

Algorithm:
  1. Teacher-forced batch and metric m (:func:`steerscope.circuits.batch.prepare`): clean =
     steered (alpha), corrupt = unsteered; m = sum over scored positions of
     logit(steered greedy token) - logit(base greedy token).
  2. Graph (:class:`steerscope.circuits.graph.Graph`) from the steering layer l up: upstream
     nodes u (the steering node s writing alpha*s into resid_pre[l], each head's write
     z_h W_O^h, each MLP's output; heads and MLPs taken BEFORE any post-sublayer norm) and
     receivers v (each head's q, each kv head's k and v, each MLP input, the logits).
  3. For T midpoint steps alpha_i = (i + 0.5)/T * alpha, run the steered forward with zero
     probes at every receiver (q/k/v projection outputs, MLP input) and backpropagate m through
     the model as autograd does (Gemma 3's q/k norms, attention soft-capping, the final logit
     soft-capping included). Each probe's gradient is pulled back through the receiver's own
     projection and input norm (exact VJP, :mod:`._vjp`): g_v(i) = d m / d(the residual copy
     read by v only). The logits receiver's g is the gradient at the final stream.
  4. Edge score IE(u, v) = sum_pos (u_clean - u_corrupt) . mean_i J_u(i)^T g_v(i), averaged over
     samples, where J_u is the Jacobian of u's way into the stream:
     - no post-sublayer norm (Llama, Mistral, Qwen): J_u = I, the stream is a plain sum of
       writes and IE(u, v) = (u - u*) . mean_i g_v(i);
     - Gemma 2/3: a sublayer's writes enter as P(A), A = their sum, P = the post-attention or
       post-MLP RMS norm, so J_u(i) = dP/dA at that step's A. The linearisation is then no
       longer a plain sum of writes: it is checked against exact patching
       (:mod:`.exact`, tests), not assumed.
     Node score of u = sum of its outgoing edge scores (= (u - u*) . dm/du averaged on the
     path). IE_vec = (alpha s) ⊙ sum_pos sum_v mean_i g_v(i) (the gradient at resid_pre[l]);
     r = IE_vec / s (used by :mod:`steerscope.analyses.sparsity`).

Cost: below layer l every run is the same, computed once (:mod:`._suffix`); the T runs share
forward/backward passes (rows = steps x samples) within ``pass_budget``. Without post-norms the
pull-back is summed over the steps in closed form before the weights are applied; with them the
per-step receiver gradients are formed one receiver block at a time.

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Formulas"; Hanna et al. 2024, "Have
faith in faithfulness" (EAP-IG); Syed et al. 2023 (edge attribution patching).
Supported: every family in :mod:`steerscope.models.families` (Llama, Mistral, Qwen, Gemma 1-3,
GPT-2 with its fused Conv1D qkv and LayerNorms, GPT-NeoX with its parallel residual, where a
block's MLP reads the block's input); :func:`check_supported` refuses scaled logits
(``logit_scale``), naming what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from steerscope.circuits._suffix import Prefix, logit_diff, prefix, run_blocks
from steerscope.circuits._vjp import norm_vjp_sum
from steerscope.circuits.batch import PatchBatch, scored_batches, trim, trim_columns
from steerscope.circuits.graph import Graph, Node
from steerscope.circuits.nodes import assemble, model_graph, node_hooks, suffix_run
from steerscope.circuits.probes import Probes, block_grads, probe_pass
from steerscope.circuits.weights import Sublayer, has_post_norms, missing_support, post_norm, post_norm_gamma
from steerscope.errors import UnsupportedModelError
from steerscope.models.lm import LM
from steerscope.vector import SteeringVector


@dataclass
class Attribution:
    """EAP-IG result. Scores are summed over positions and averaged over samples."""

    graph: Graph
    edges: torch.Tensor  # [U V], 0 where no edge
    nodes: torch.Tensor  # [U] sum of outgoing edge scores
    ie_vec: torch.Tensor  # [d_model] dimension-level effect of the steering node
    mean_grad: torch.Tensor  # [d_model] r = IE_vec / s (alpha * mean total gradient)
    m_clean: float
    m_corrupt: float
    n_samples: int
    s_edges: torch.Tensor  # [n V] the steering node's edge scores per sample (mean over samples = edges[0])

    def top_nodes(self, k: int = 10, skip_s: bool = True) -> list[tuple[Node, float]]:
        """The k nodes of largest |score| as (node, score), largest first."""
        order = self.nodes.abs().argsort(descending=True).tolist()
        out = [(self.graph.upstream[i], float(self.nodes[i])) for i in order
               if not (skip_s and self.graph.upstream[i].kind == "steer")]
        return out[:k]


def check_supported(lm: LM) -> None:
    """Raise :class:`UnsupportedModelError` naming what the circuit algorithms lack for ``lm``."""
    missing = missing_support(lm)
    if missing:
        raise UnsupportedModelError(
            f"EAP-IG, exact patching and circuits do not support {lm.config.model_type}: they lack "
            f"{'; '.join(missing)}. Use a Llama, Mistral, Qwen, Gemma, GPT-2 or GPT-NeoX model.")


def default_pass_budget(lm: LM, memory_gib: float = 1.0) -> int:
    """Row-positions x blocks one EAP-IG forward/backward may keep for its backward pass.

    Estimated from the activations a block keeps per row-position (about 8 d_model + 4 d_ff
    values), so that one pass holds about ``memory_gib`` GiB.
    """
    ff = int(getattr(lm.config, "intermediate_size", 4 * lm.d_model))
    per = (8 * lm.d_model + 4 * ff) * torch.finfo(lm.dtype).bits // 8
    return max(1, int(memory_gib * 2**30) // per)


def receiver_grads(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One steered forward/backward with probes: residual-space gradient of every receiver.

    Returns:
        (grads [batch pos V d_model] in receiver order, m per sample [batch]).

    Example:
        >>> g, m = receiver_grads(lm, pb, vec, -0.5, graph)  # g.sum(2) = d m / d resid_pre[l]
    """
    layer0, s = vector.single_layer(purpose="attribution")
    pre = prefix(lm, pb.inputs(), layer0)
    pr = probe_pass(lm, pb, pre, s, [alpha])
    parts = [grad for _cols, grad in block_grads(lm, pr, graph, 1)]
    return torch.cat(parts, 2), pr.m[0]


Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # edges [U V], gsum [d_model], s_rows [batch V]


def _plain_edges(pr: Probes, graph: Graph, diff: torch.Tensor, lm: LM) -> Scores:
    """Edge scores [U V] (summed over the steps and samples), the summed total gradient [d_model] and
    the steering node's edge scores per sample [batch V]: J_u = I (no post-sublayer norm)."""
    dev = diff.device
    edges = torch.zeros(graph.valid.shape, dtype=torch.float64, device=dev)
    gsum = torch.zeros(diff.shape[-1], dtype=torch.float64, device=dev)
    s_row = graph.index(Node.steer(graph.layer0))
    s_rows = torch.zeros(diff.shape[0], graph.valid.shape[1], dtype=torch.float64, device=dev)
    for cols, part in block_grads(lm, pr, graph, pr.k):  # [b pos n d_model] summed over the steps
        for j in range(part.shape[0]):  # contract d_model in fp32 per position, sum positions in fp64
            e = torch.einsum("pud,pvd->puv", diff[j], part[j]).double().sum(0)
            edges[:, cols] += e
            s_rows[j, cols] += e[s_row]
        gsum += part.sum((0, 1, 2)).double()
    return edges, gsum, s_rows


def _sublayers(graph: Graph) -> Iterator[tuple[list[int], int, Sublayer, str]]:
    """(node rows, layer, sublayer, key of its pre-norm sum in the probes) per sublayer, in order."""
    for layer in range(graph.layer0, graph.n_layers):
        rows = graph.node_rows(layer)
        yield rows[:-1], layer, "attn", f"A{layer}"
        yield rows[-1:], layer, "mlp", f"M{layer}"


def _normed_edges(pr: Probes, graph: Graph, diff: torch.Tensor, lm: LM) -> Scores:
    """As :func:`_plain_edges` with J_u = dP/dA of u's post-sublayer norm at each step (Gemma 2/3)."""
    dev = diff.device
    edges = torch.zeros(graph.valid.shape, dtype=torch.float64, device=dev)
    gsum = torch.zeros(diff.shape[-1], dtype=torch.float64, device=dev)
    k, b = pr.k, diff.shape[0]
    s_row = graph.index(Node.steer(graph.layer0))
    s_rows = torch.zeros(b, graph.valid.shape[1], dtype=torch.float64, device=dev)
    for cols, g in block_grads(lm, pr, graph, 1):  # per step: [k*b pos n d_model]
        summed = g.view(k, b, *g.shape[1:]).sum(0)
        gsum += summed.sum((0, 1, 2)).double()
        per = torch.einsum("bpd,bpvd->bv", diff[:, :, s_row], summed).double()
        s_rows[:, cols] += per
        edges[s_row, cols] += per.sum(0)
        read = min(graph.read_order(c) for c in cols)
        for rows, layer, sub, key in _sublayers(graph):
            if graph.upstream[rows[0]].order >= read:
                break
            norm = post_norm(lm, layer, sub)
            pulled = summed if norm is None else norm_vjp_sum(norm, post_norm_gamma(lm, layer, sub), pr.xs[key], g, k)
            edges[rows[0] : rows[-1] + 1, cols] += torch.einsum(
                "bpud,bpvd->uv", diff[:, :, rows], pulled).double()
    return edges, gsum, s_rows


def _batch_scores(lm: LM, sub: PatchBatch, pre: Prefix, s: torch.Tensor, alpha: float, diff: torch.Tensor,
                  graph: Graph, steps: int, pass_budget: int) -> Scores:
    """Edge scores [U V] and total gradient [d_model] of one batch, summed over samples, and the steering
    node's edge scores per sample [b V]; all averaged over steps."""
    b, p = sub.ids.shape
    per_pass = max(1, min(steps, pass_budget // (b * p * (lm.n_layers - pre.layer))))
    points = [alpha * (i + 0.5) / steps for i in range(steps)]
    score = _normed_edges if has_post_norms(lm) else _plain_edges
    dev = diff.device
    edges = torch.zeros(graph.valid.shape, dtype=torch.float64, device=dev)
    gsum = torch.zeros(lm.d_model, dtype=torch.float64, device=dev)
    s_rows = torch.zeros(b, graph.valid.shape[1], dtype=torch.float64, device=dev)
    for j in range(0, steps, per_pass):
        pr = probe_pass(lm, sub, pre, s, points[j : j + per_pass])
        e, g, r = score(pr, graph, diff, lm)
        edges += e
        gsum += g
        s_rows += r
    return edges / steps, gsum / steps, s_rows / steps


def eap_ig(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, steps: int = 10,
           batch_size: int = 4, corrupt: torch.Tensor | None = None, pass_budget: int | None = None
           ) -> Attribution:
    """Multi-token EAP-IG edge, node and dimension-level scores of a steering vector.

    Args:
        lm: a supported model (see :func:`check_supported`).
        pb: from :func:`steerscope.circuits.batch.prepare` with the same vector and alpha.
        vector: one-layer resid_pre vector s; alpha: its scale (clean = alpha, corrupt = 0).
        steps: T midpoint steps on the path alpha_i = (i + 0.5)/T * alpha.
        batch_size: samples per pass; the T steps of those samples share one forward/backward
            as far as ``pass_budget`` allows (rows = steps x samples), else they are split.
        corrupt: precomputed corrupt node writes [batch pos U d_model] (default: recorded).
        pass_budget: row-positions x blocks per forward/backward (default
            :func:`default_pass_budget`, about 1 GiB of activations).

    Returns:
        :class:`Attribution` (edges [U V], nodes [U], ie_vec [d_model], mean_grad [d_model]).

    Example:
        >>> att = eap_ig(lm, prepare(lm, prompts, vec, -1.0), vec, -1.0)
        >>> att.top_nodes(5)
    """
    check_supported(lm)
    layer0, s = vector.single_layer(purpose="attribution")
    graph = model_graph(lm, layer0)
    budget = default_pass_budget(lm) if pass_budget is None else pass_budget
    edges = torch.zeros(graph.valid.shape, dtype=torch.float64)
    gsum = torch.zeros(lm.d_model, dtype=torch.float64)
    n, mc, mk = pb.ids.shape[0], 0.0, 0.0
    s_edges = torch.zeros(n, graph.valid.shape[1], dtype=torch.float64)
    for idx in scored_batches(pb, batch_size):
        cols = trim_columns(pb.rows(idx))
        sub = trim(pb.rows(idx))
        outs: dict[str, torch.Tensor] = {}
        pre = prefix(lm, sub.inputs(), layer0, node_hooks(lm, layer0, outs))  # the corrupt run
        with torch.no_grad():
            rows = torch.arange(sub.ids.shape[0], device=pre.final.device)
            mk += float(logit_diff(lm, pre.final, rows, sub.y_steer, sub.y_base, sub.mask).sum())
        corr = assemble(lm, outs, layer0, 0.0 * s) if corrupt is None else corrupt[idx][:, cols]
        clean, m = suffix_run(lm, sub, pre, alpha * s)
        mc += float(m.sum())
        e, g, rows_s = _batch_scores(lm, sub, pre, s, alpha, clean - corr, graph, steps, budget)
        edges += e.cpu()  # the scores are collected on the CPU, whatever device the model is on
        gsum += g.cpu()
        s_edges[idx] = rows_s.cpu()
    edges = torch.where(graph.valid, edges, torch.zeros_like(edges)) / n
    r = alpha * gsum / n
    return Attribution(graph=graph, edges=edges.float(), nodes=edges.sum(1).float(),
                       ie_vec=(s.double() * r).float(), mean_grad=r.float(), m_clean=mc / n, m_corrupt=mk / n,
                       n_samples=n, s_edges=torch.where(graph.valid[0], s_edges, torch.zeros_like(s_edges)))



def mean_gradient(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, steps: int = 10,
                  batch_size: int = 4) -> torch.Tensor:
    """``eap_ig(...).mean_grad`` without the edges: alpha times the IG mean gradient of m at the steering
    site (summed over positions, averaged over samples), by plain autograd on the added vector. [d_model]

    The metric and batch are ``pb``'s (its steered and base tokens), the path is ``alpha * vector``: so a
    random vector can be scored on another vector's batch (the random-vector null of
    :mod:`steerscope.analyses.sparsity`) at the cost of ``steps`` forward/backward passes, not EAP-IG's.

    Example:
        >>> torch.allclose(mean_gradient(lm, pb, vec, -1.0), eap_ig(lm, pb, vec, -1.0).mean_grad)
    """
    check_supported(lm)
    layer0, s = vector.single_layer(purpose="attribution")
    gsum = torch.zeros(lm.d_model, dtype=torch.float64)
    for idx in scored_batches(pb, batch_size):
        sub = trim(pb.rows(idx))
        pre = prefix(lm, sub.inputs(), layer0)
        rows = torch.arange(pre.n_samples, device=pre.resid.device)
        for i in range(steps):
            add = (alpha * (i + 0.5) / steps * s).to(pre.resid.device, lm.dtype).requires_grad_(True)
            with torch.enable_grad():
                resid, r = run_blocks(lm, pre, pre.resid + add, rows)
                m = logit_diff(lm, resid, r, sub.y_steer, sub.y_base, sub.mask)
                (g,) = torch.autograd.grad(m.sum(), add)
            gsum += g.double().cpu() / steps
    return (alpha * gsum / pb.ids.shape[0]).float()
