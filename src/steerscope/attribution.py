"""Multi-token EAP-IG for a steering vector (paper A, §4; Hanna et al. 2024; Syed et al. 2023).

Algorithm:
  1. Generate the steered greedy response (alpha, all positions) and teacher-force prompt +
     response in one pass, steered (clean) and unsteered (corrupt). At every response position
     the metric is m_t = logit(steered greedy token) - logit(base greedy token); positions where
     the two greedy tokens agree are masked; m = sum_t m_t per sample (:func:`prepare`).
  2. Graph (:class:`Graph`), from the steering layer l up. Upstream nodes u: the steering node s
     (writes alpha*s into resid_pre[l]), every attention head (writes z_h @ W_O^h), every MLP.
     Receivers v: each head's q input, each key/value head's k and v inputs (GQA: one k and one v
     receiver per kv head), each MLP input, and the logits. An edge u -> v exists when u writes
     into the residual stream before v reads it.
  3. For T midpoint steps alpha_i = (i + 0.5)/T * alpha, run the steered forward with zero
     "probes" added at every receiver (attn.q|k|v outputs, mlp_in), backpropagate m, and map
     each probe's gradient back to the residual stream through the receiver's own linear map and
     norm (exact vector-Jacobian product): g_v = d m / d(residual copy read by v only).
  4. Average g_v over the T steps (integrated gradients). Edge score
     IE(u, v) = sum_pos (u_clean - u_corrupt) . mean_i g_v, averaged over samples.
     Node score of u = sum of its outgoing edge scores (= (u - u*) . dm/du). The steering
     node's dimension-level effect is IE_vec = (alpha s) ⊙ sum_pos sum_v g_v (the total gradient
     at resid_pre[l]); r = IE_vec / s is alpha times the mean gradient (used by sparsify.py).

Cost: every run of one batch is identical below the steering layer l, so that part is computed
once (one unsteered forward, which is also the corrupt run; :mod:`steerscope.suffix`); the clean
run and the T interpolated runs start at block l, and the T runs share one forward/backward
(rows = steps x samples). m is read from two unembedding rows at the scored positions only;
columns after the last scored position and all-padding columns are dropped and samples with no
scored position skipped (:func:`trim`, :func:`scored_batches`: none can change a score). The
pull-back through each receiver's norm is in closed form, summed over the steps before the
projection weights are applied (:mod:`steerscope.vjp`).

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Formulas"; Hanna et al. 2024,
"Have faith in faithfulness" (EAP-IG); Syed et al. 2023 (edge attribution patching).
Supported: families with separate q/k/v projections and no post-sublayer norms (Llama, Mistral,
Qwen): there the residual stream is exactly a sum of component outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from steerscope.errors import SteerscopeError, UnsupportedModelError
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.steer import steering
from steerscope.suffix import Prefix, logit_diff, prefix, run_blocks
from steerscope.vector import SteeringVector
from steerscope.vjp import norm_vjp, norm_vjp_sum, rms_params, rms_proj_vjp_sum  # noqa: F401 (norm_vjp: public)


@dataclass
class PatchBatch:
    """A teacher-forced batch with its metric targets. All tensors [batch pos].

    ``y_steer``/``y_base`` are the greedy next tokens predicted at each position by the steered
    and the unsteered model; ``mask`` marks scored positions (response, and tokens disagree).
    """

    ids: torch.Tensor
    attn: torch.Tensor
    pos_ids: torch.Tensor
    y_steer: torch.Tensor
    y_base: torch.Tensor
    mask: torch.Tensor
    texts: list[str] = field(default_factory=list)


@dataclass
class Graph:
    """Node and edge names of the attribution graph from layer ``layer0`` up.

    ``upstream[i]`` is ``"s"``, ``"L{l}.H{h}"`` or ``"L{l}.MLP"``; ``receivers[j]`` is
    ``"L{l}.H{h}.q"``, ``"L{l}.KV{g}.k"``, ``"L{l}.KV{g}.v"``, ``"L{l}.MLP"`` or ``"logits"``;
    ``valid[i, j]`` says whether the edge exists.
    """

    layer0: int
    n_layers: int
    n_heads: int
    n_kv: int
    upstream: list[str]
    receivers: list[str]
    valid: torch.Tensor  # bool [U V]

    @classmethod
    def build(cls, layer0: int, n_layers: int, n_heads: int, n_kv: int) -> Graph:
        ups, wkey = ["s"], [2 * layer0 - 0.5]
        recv, rkey = [], []
        for layer in range(layer0, n_layers):
            ups += [f"L{layer}.H{h}" for h in range(n_heads)] + [f"L{layer}.MLP"]
            wkey += [2 * layer] * n_heads + [2 * layer + 1]
            names = ([f"L{layer}.H{h}.q" for h in range(n_heads)] + [f"L{layer}.KV{g}.k" for g in range(n_kv)]
                     + [f"L{layer}.KV{g}.v" for g in range(n_kv)] + [f"L{layer}.MLP"])
            recv += names
            rkey += [2 * layer] * (n_heads + 2 * n_kv) + [2 * layer + 1]
        recv.append("logits")
        rkey.append(float("inf"))
        valid = torch.tensor(wkey)[:, None] < torch.tensor(rkey)[None, :]
        return cls(layer0, n_layers, n_heads, n_kv, ups, recv, valid)

    def per_layer(self) -> int:
        """Receivers per layer (q heads + k and v kv-heads + the MLP)."""
        return self.n_heads + 2 * self.n_kv + 1

    def recv_slice(self, layer: int) -> slice:
        k = self.per_layer()
        i = (layer - self.layer0) * k
        return slice(i, i + k)

    def up_slice(self, layer: int) -> slice:
        i = 1 + (layer - self.layer0) * (self.n_heads + 1)
        return slice(i, i + self.n_heads + 1)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


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

    def top_nodes(self, k: int = 10, skip_s: bool = True) -> list[tuple[str, float]]:
        order = self.nodes.abs().argsort(descending=True).tolist()
        out = [(self.graph.upstream[i], float(self.nodes[i])) for i in order if not (skip_s and i == 0)]
        return out[:k]


def check_supported(lm: LM) -> None:
    """Raise unless the residual stream is a plain sum of component outputs."""
    f, cfg = lm.family, lm.model.config
    scaled = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    if f.qkv != "separate" or f.post_attn_norm or f.post_mlp_norm or f.parallel_residual or scaled:
        raise UnsupportedModelError(
            f"EAP-IG supports Llama-like models (separate q/k/v, no post-sublayer norms, plain logits); "
            f"{lm.model.config.model_type} is not one. Use a Llama, Mistral or Qwen model.")


# rows x positions x d_model x blocks of one EAP-IG forward/backward: bounds the activations kept
# for the backward (about 1 GB; SmolLM2-135M from layer 18: 2048 row-positions per pass)
_PASS_BUDGET = 2048 * 576 * 12


def _single(vector: SteeringVector) -> tuple[int, torch.Tensor]:
    if len(vector) != 1 or vector.site != "resid_pre":
        raise SteerscopeError("attribution takes a one-layer resid_pre vector; use vector.select([layer])")
    layer = vector.layers[0]
    return layer, vector[layer]


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as ``generate`` computes them. [batch pos]"""
    return (attn.long().cumsum(-1) - 1).clamp(min=0)


def forward(lm: LM, pb: PatchBatch) -> torch.Tensor:
    """Teacher-forced logits [batch pos vocab] (position ids consistent with generation)."""
    return lm.model(input_ids=pb.ids, attention_mask=pb.attn, position_ids=pb.pos_ids).logits


def metric(logits: torch.Tensor, pb: PatchBatch) -> torch.Tensor:
    """m per sample: sum over scored positions of logit(y_steer) - logit(y_base). [batch]"""
    ls = logits.gather(-1, pb.y_steer[..., None])[..., 0]
    lb = logits.gather(-1, pb.y_base[..., None])[..., 0]
    return ((ls - lb) * pb.mask.to(logits.dtype)).sum(-1)


@torch.no_grad()
def prepare(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, max_new_tokens: int = 32,
            chat: bool = True) -> PatchBatch:
    """Steered greedy responses, teacher-forced; greedy targets and the agreement mask.

    Example:
        >>> pb = prepare(lm, ["How do I pick a lock?"], vec, alpha=-1.0, max_new_tokens=24)
    """
    texts = [lm.format_chat(p) if chat else p for p in prompts]
    enc = lm.tokenize(texts, padding_side="left", templated=chat)
    P = enc["input_ids"].shape[1]
    with steering(lm, vector, alpha):
        ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    attn = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, P:])], 1)
    pb = PatchBatch(ids, attn, position_ids(attn), ids, ids, torch.zeros_like(ids, dtype=torch.bool))
    base = forward(lm, pb).argmax(-1)
    with steering(lm, vector, alpha):
        steer = forward(lm, pb).argmax(-1)
    n = ids.shape[1]
    resp = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    resp[:, P - 1 : n - 1] = True  # logits at P-1 .. n-2 predict the response tokens
    eos = lm.tokenizer.eos_token_id
    gen = ids[:, P:]
    if eos is not None:  # stop scoring after the first end-of-sequence token
        done = (gen == eos).long().cumsum(1) - (gen == eos).long()
        resp[:, P - 1 : n - 1] &= done == 0
    pb.y_steer, pb.y_base = steer, base
    pb.mask = resp & (steer != base)
    pb.texts = lm.tokenizer.batch_decode(gen, skip_special_tokens=True)
    return pb


def head_outputs(z: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """Per-head writes into the residual: [batch pos head d_head] x [head d_head d_model] -> [batch pos head d_model]."""
    return torch.einsum("bphe,hed->bphd", z, W_O.to(z.dtype))


def _node_hooks(lm: LM, layer0: int, outs: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """Hooks that record each head's z and each MLP's output from block ``layer0`` up into ``outs``."""
    hooks: dict[str, Callable] = {}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.attn.z"] = lambda x, _c, layer=layer: outs.__setitem__(f"z{layer}", x.clone())
        hooks[f"blocks.{layer}.mlp_out"] = lambda x, _c, layer=layer: outs.__setitem__(f"m{layer}", x.clone())
    return hooks


def _assemble(lm: LM, outs: dict[str, torch.Tensor], layer0: int, s_term: torch.Tensor) -> torch.Tensor:
    """Upstream node outputs [batch pos U d_model] from recorded z / mlp_out and the steering term [d_model]."""
    b, p = outs[f"m{layer0}"].shape[:2]
    parts = [s_term.to(lm.dtype).expand(b, p, 1, -1)]
    for layer in range(layer0, lm.n_layers):
        parts += [head_outputs(outs[f"z{layer}"], lm.W_O(layer)), outs[f"m{layer}"][:, :, None]]
    return torch.cat(parts, 2)


@torch.no_grad()
def node_values(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float) -> torch.Tensor:
    """Upstream node outputs of one run (alpha=0: the corrupt run): [batch pos U d_model]."""
    layer0, s = _single(vector)
    outs: dict[str, torch.Tensor] = {}
    with steering(lm, vector, alpha), attached(lm, _node_hooks(lm, layer0, outs)):
        forward(lm, pb)
    return _assemble(lm, outs, layer0, alpha * s)


def inputs(pb: PatchBatch) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a teacher-forced forward of ``pb``."""
    return {"input_ids": pb.ids, "attention_mask": pb.attn, "position_ids": pb.pos_ids}


def trim_columns(pb: PatchBatch) -> slice:
    """The columns that can change m: up to the last scored position (causal), from the first
    real token of any row (padding before it is masked everywhere)."""
    cols = pb.mask.any(0).nonzero()
    stop = int(cols.max()) + 1 if len(cols) else 1
    real = pb.attn.bool().any(0).nonzero()
    return slice(min(int(real.min()), stop - 1) if len(real) else 0, stop)


def trim(pb: PatchBatch) -> PatchBatch:
    """``pb`` restricted to :func:`trim_columns` (every score and effect is unchanged)."""
    sl = trim_columns(pb)
    return PatchBatch(pb.ids[:, sl], pb.attn[:, sl], pb.pos_ids[:, sl], pb.y_steer[:, sl], pb.y_base[:, sl],
                      pb.mask[:, sl], pb.texts)


def scored_batches(pb: PatchBatch, batch_size: int) -> list[torch.Tensor]:
    """Sample indices in batches of ``batch_size``, skipping samples with no scored position
    (their m is 0 in every run, so they add nothing to any score or effect)."""
    idx = pb.mask.any(1).nonzero()[:, 0].cpu()
    return list(idx.split(batch_size))


@torch.no_grad()
def suffix_run(lm: LM, pb: PatchBatch, pre: Prefix, add: torch.Tensor,
               hooks: dict[str, Callable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run whose stream entering block ``pre.layer`` is ``pre.resid + add`` ([d_model]), from there up.

    Returns:
        (node outputs [batch pos U d_model] with ``add`` as the first node, m per sample [batch]).
    """
    outs: dict[str, torch.Tensor] = {}
    rows = torch.arange(pre.n_samples, device=pre.resid.device)
    with attached(lm, {**(hooks or {}), **_node_hooks(lm, pre.layer, outs)}):
        resid, rows = run_blocks(lm, pre, pre.resid + add.to(lm.dtype), rows)
    return _assemble(lm, outs, pre.layer, add), logit_diff(lm, resid, rows, pb.y_steer, pb.y_base, pb.mask)


def _bias(lm: LM, layer: int, which: str, n: int) -> torch.Tensor | float:
    """Projection bias per head [n d_head], or 0."""
    bias = getattr(lm.module(layer, getattr(lm.family, f"{which}_proj")), "bias", None)
    return 0.0 if bias is None else bias.detach().view(n, lm.d_head)


def _weight(lm: LM, layer: int, which: str, n: int) -> torch.Tensor:
    """Projection weights per head [n d_head d_model] for q/k/v."""
    w = lm.module(layer, getattr(lm.family, f"{which}_proj")).weight.detach()
    return w.view(n, lm.d_head, lm.d_model)


def receiver_grads(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, graph: Graph
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One steered forward/backward with probes: residual-space gradient of every receiver.

    Returns:
        (grads [batch pos V d_model], m per sample [batch]).
    """
    layer0, s = _single(vector)
    pre = prefix(lm, inputs(pb), layer0)
    parts, m = _ig_grads(lm, pb, pre, s, [alpha], graph)
    return torch.cat(parts, 2), m[0]


def _ig_grads(lm: LM, pb: PatchBatch, pre: Prefix, s: torch.Tensor, alphas: Sequence[float], graph: Graph
              ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Receiver gradients at the path points ``alphas``, all in one forward/backward (rows = points x samples).

    Returns:
        (grads summed over the points, in receiver order as consecutive parts [batch pos n_i d_model]
        whose n_i add up to V, m [points batch]).
    """
    layer0, k = pre.layer, len(alphas)
    b, p = pb.ids.shape
    H, Hk, dh, d = lm.n_heads, lm.n_kv_heads, lm.d_head, lm.d_model
    dev = pre.resid.device
    rows = torch.arange(b, device=dev).repeat(k)  # row = point * b + sample
    a = torch.tensor(list(alphas), dtype=torch.float32).repeat_interleave(b)
    hidden = pre.resid[rows] + (a[:, None] * s.float()[None]).to(dev, lm.dtype)[:, None]
    probes: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}

    def probe(key: str) -> Callable:
        def fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
            xs[key] = x.detach()  # the receiver's own output (q/k/v projection or normed MLP input)
            probes[key] = torch.zeros_like(x, requires_grad=True)
            return x + probes[key]
        return fn

    def keep(key: str) -> Callable:
        return lambda x, _c: xs.__setitem__(key, x.detach())

    hooks: dict[str, Callable] = {}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.resid_pre"] = keep(f"pre{layer}")
        hooks[f"blocks.{layer}.resid_mid"] = keep(f"mid{layer}")
        for which in "qkv":
            hooks[f"blocks.{layer}.attn.{which}"] = probe(f"{which}{layer}")
        hooks[f"blocks.{layer}.mlp_in"] = probe(f"m{layer}")
    with torch.enable_grad(), attached(lm, hooks):
        resid, rows = run_blocks(lm, pre, hidden, rows)
        m = logit_diff(lm, resid, rows, pb.y_steer, pb.y_base, pb.mask)
        keys = list(probes)
        gs = torch.autograd.grad(m.sum(), [probes[key] for key in keys], allow_unused=True)
    g = dict(zip(keys, gs))
    R = k * b
    out = []
    fam = lm.family
    qkv = (("q", H), ("k", Hk), ("v", Hk))
    for layer in range(layer0, lm.n_layers):
        gq = torch.cat([g[f"{w}{layer}"] if g[f"{w}{layer}"] is not None else
                        torch.zeros(R, p, n, dh, dtype=lm.dtype, device=dev) for w, n in qkv], 2)  # [R pos n d_head]
        W = torch.cat([_weight(lm, layer, w, n) for w, n in qkv])  # [n d_head d_model], n = H + 2 Hk
        rms = rms_params(lm, layer, fam.input_norm)
        if rms is not None:  # factored: never forms the [R pos n d_model] cotangents
            proj = torch.cat([xs[f"{w}{layer}"] - _bias(lm, layer, w, n) for w, n in qkv], 2)
            out.append(rms_proj_vjp_sum(xs[f"pre{layer}"], gq, proj, W, rms[0], rms[1], k))
        else:
            cot = torch.einsum("bphe,hed->bphd", gq, W)
            out.append(norm_vjp_sum(lm, layer, fam.input_norm, xs[f"pre{layer}"], cot, k))
        gm = g[f"m{layer}"]
        gm = torch.zeros(R, p, d, dtype=lm.dtype, device=dev) if gm is None else gm
        out.append(norm_vjp_sum(lm, layer, fam.pre_mlp_norm, xs[f"mid{layer}"], gm[:, :, None], k))
    W_U = lm.W_U()
    gl = (W_U[pb.y_steer] - W_U[pb.y_base]) * pb.mask[..., None].to(W_U.dtype)  # d m / d(normed final)
    out.append(norm_vjp_sum(lm, None, fam.final_norm, resid.detach(), gl[rows][:, :, None], k))
    return out, m.detach().view(k, b)


def eap_ig(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, steps: int = 10,
           batch_size: int = 4, corrupt: torch.Tensor | None = None) -> Attribution:
    """Multi-token EAP-IG edge, node and dimension-level scores of a steering vector.

    Args:
        lm: a Llama-like model (see :func:`check_supported`).
        pb: from :func:`prepare` with the same vector and alpha.
        vector: one-layer resid_pre vector s; alpha: its scale (clean = alpha, corrupt = 0).
        steps: T midpoint steps on the path alpha_i = (i + 0.5)/T * alpha.
        batch_size: samples per pass; the T steps of those samples share one forward/backward
            as far as a memory budget allows (rows = steps x samples), else they are split.

    Returns:
        :class:`Attribution` (edges [U V], nodes [U], ie_vec [d_model], mean_grad [d_model]).

    Example:
        >>> att = eap_ig(lm, prepare(lm, prompts, vec, -1.0), vec, -1.0)
        >>> att.top_nodes(5)
    """
    check_supported(lm)
    layer0, s = _single(vector)
    graph = Graph.build(layer0, lm.n_layers, lm.n_heads, lm.n_kv_heads)
    U, V = graph.valid.shape
    edges = torch.zeros(U, V, dtype=torch.float64)
    gsum = torch.zeros(lm.d_model, dtype=torch.float64)
    n = pb.ids.shape[0]
    mc, mk = 0.0, 0.0
    points = [alpha * (k + 0.5) / steps for k in range(steps)]
    for idx in scored_batches(pb, batch_size):
        cols = trim_columns(_rows(pb, idx))
        sub = trim(_rows(pb, idx))
        b, p = sub.ids.shape
        outs: dict[str, torch.Tensor] = {}
        pre = prefix(lm, inputs(sub), layer0, _node_hooks(lm, layer0, outs))  # the corrupt run
        with torch.no_grad():
            rows = torch.arange(b, device=pre.final.device)
            mk += float(logit_diff(lm, pre.final, rows, sub.y_steer, sub.y_base, sub.mask).sum())
        corr = _assemble(lm, outs, layer0, 0.0 * s) if corrupt is None else corrupt[idx][:, cols]
        clean, m = suffix_run(lm, sub, pre, alpha * s)
        mc += float(m.sum())
        per_pass = max(1, min(steps, _PASS_BUDGET // (b * p * lm.d_model * (lm.n_layers - layer0))))
        gbar: list[torch.Tensor] = []
        for j in range(0, steps, per_pass):
            parts, _ = _ig_grads(lm, sub, pre, s, points[j : j + per_pass], graph)
            gbar = parts if not gbar else [a.add_(c) for a, c in zip(gbar, parts)]
        diff = clean - corr
        with torch.no_grad():
            col = 0
            for part in gbar:  # [b pos n d_model] summed over the steps
                sl = slice(col, col + part.shape[2])
                for j in range(b):  # contract d_model in fp32 per position, sum positions in fp64
                    edges[:, sl] += torch.einsum("pud,pvd->puv", diff[j], part[j]).double().sum(0) / steps
                gsum += part.sum((0, 1, 2)).double() / steps
                col = sl.stop
    edges = torch.where(graph.valid, edges, torch.zeros_like(edges)) / n
    r = alpha * gsum / n
    return Attribution(graph=graph, edges=edges.float(), nodes=edges.sum(1).float(),
                       ie_vec=(s.double() * r).float(), mean_grad=r.float(), m_clean=mc / n, m_corrupt=mk / n,
                       n_samples=n)


def _rows(pb: PatchBatch, sl: slice | torch.Tensor) -> PatchBatch:
    texts = pb.texts[sl] if isinstance(sl, slice) else [pb.texts[i] for i in sl.tolist() if i < len(pb.texts)]
    return PatchBatch(pb.ids[sl], pb.attn[sl], pb.pos_ids[sl], pb.y_steer[sl], pb.y_base[sl], pb.mask[sl], texts)
