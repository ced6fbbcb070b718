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

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Formulas"; Hanna et al. 2024,
"Have faith in faithfulness" (EAP-IG); Syed et al. 2023 (edge attribution patching).
Supported: families with separate q/k/v projections and no post-sublayer norms (Llama, Mistral,
Qwen): there the residual stream is exactly a sum of component outputs.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Sequence

import torch

from steerscope.errors import SteerscopeError, UnsupportedModelError
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector


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
    f = lm.family
    if f.qkv != "separate" or f.post_attn_norm or f.post_mlp_norm or f.parallel_residual:
        raise UnsupportedModelError(
            f"EAP-IG supports Llama-like models (separate q/k/v, no post-sublayer norms); "
            f"{lm.model.config.model_type} is not one. Use a Llama, Mistral or Qwen model.")


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


@torch.no_grad()
def node_values(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float) -> torch.Tensor:
    """Upstream node outputs of one run (alpha=0: the corrupt run): [batch pos U d_model]."""
    layer0, s = _single(vector)
    outs: dict[str, torch.Tensor] = {}
    hooks = {}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.attn.z"] = lambda x, _c, layer=layer: outs.__setitem__(f"z{layer}", x.clone())
        hooks[f"blocks.{layer}.mlp_out"] = lambda x, _c, layer=layer: outs.__setitem__(f"m{layer}", x.clone())
    with steering(lm, vector, alpha), attached(lm, hooks):
        forward(lm, pb)
    b, p = pb.ids.shape
    parts = [(alpha * s).to(lm.dtype).expand(b, p, 1, -1)]
    for layer in range(layer0, lm.n_layers):
        parts += [head_outputs(outs[f"z{layer}"], lm.W_O(layer)), outs[f"m{layer}"][:, :, None]]
    return torch.cat(parts, 2)


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
    layer0, _ = _single(vector)
    b, p = pb.ids.shape
    H, Hk, dh, d = lm.n_heads, lm.n_kv_heads, lm.d_head, lm.d_model
    probes: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}

    def probe(key: str, shape: tuple[int, ...]):  # noqa: ANN202
        def fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
            t = torch.zeros(shape, dtype=x.dtype, device=x.device, requires_grad=True)
            probes[key] = t
            return x + t
        return fn

    def keep(key: str):  # noqa: ANN202
        return lambda x, _c: xs.__setitem__(key, x.detach())

    hooks: dict = {}
    for layer in range(layer0, lm.n_layers):
        hooks[f"blocks.{layer}.resid_pre"] = keep(f"pre{layer}")
        hooks[f"blocks.{layer}.resid_mid"] = keep(f"mid{layer}")
        hooks[f"blocks.{layer}.attn.q"] = probe(f"q{layer}", (b, p, H, dh))
        hooks[f"blocks.{layer}.attn.k"] = probe(f"k{layer}", (b, p, Hk, dh))
        hooks[f"blocks.{layer}.attn.v"] = probe(f"v{layer}", (b, p, Hk, dh))
        hooks[f"blocks.{layer}.mlp_in"] = probe(f"m{layer}", (b, p, d))
    hooks[f"blocks.{lm.n_layers - 1}.resid_post"] = keep("final")
    with torch.enable_grad(), ExitStack() as st:
        st.enter_context(steering(lm, vector, alpha))  # registered first: the probes see the steered stream
        st.enter_context(attached(lm, hooks))
        logits = forward(lm, pb)
        m = metric(logits, pb)
        keys = list(probes)
        gs = torch.autograd.grad(m.sum(), [probes[k] for k in keys], allow_unused=True)
    g = dict(zip(keys, gs))
    out = []
    for layer in range(layer0, lm.n_layers):
        fam = lm.family
        n1, n2 = lm.module(layer, fam.input_norm), lm.module(layer, fam.pre_mlp_norm)
        cot = []
        for which, n in (("q", H), ("k", Hk), ("v", Hk)):
            gg = g[f"{which}{layer}"]
            gg = torch.zeros(b, p, n, dh, dtype=lm.dtype) if gg is None else gg
            cot.append(torch.einsum("bphe,hed->bphd", gg, _weight(lm, layer, which, n)))
        out.append(norm_vjp(n1, xs[f"pre{layer}"], torch.cat(cot, 2)))
        gm = g[f"m{layer}"]
        gm = torch.zeros(b, p, d, dtype=lm.dtype) if gm is None else gm
        out.append(norm_vjp(n2, xs[f"mid{layer}"], gm[:, :, None]))
    W_U = lm.W_U()
    gl = (W_U[pb.y_steer] - W_U[pb.y_base]) * pb.mask[..., None].to(W_U.dtype)  # d m / d(normed final)
    out.append(norm_vjp(lm.module(None, lm.family.final_norm), xs["final"], gl[:, :, None]))
    return torch.cat(out, 2), m.detach()


def eap_ig(lm: LM, pb: PatchBatch, vector: SteeringVector, alpha: float, steps: int = 10,
           batch_size: int = 4, corrupt: torch.Tensor | None = None) -> Attribution:
    """Multi-token EAP-IG edge, node and dimension-level scores of a steering vector.

    Args:
        lm: a Llama-like model (see :func:`check_supported`).
        pb: from :func:`prepare` with the same vector and alpha.
        vector: one-layer resid_pre vector s; alpha: its scale (clean = alpha, corrupt = 0).
        steps: T midpoint steps on the path alpha_i = (i + 0.5)/T * alpha.
        batch_size: rows per forward/backward.

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
    for i in range(0, n, batch_size):
        sub = _rows(pb, slice(i, i + batch_size))
        clean = node_values(lm, sub, vector, alpha)
        corr = node_values(lm, sub, vector, 0.0) if corrupt is None else corrupt[i : i + batch_size]
        with torch.no_grad():
            mk += float(metric(forward(lm, sub), sub).sum())
        gbar = None
        for k in range(steps):
            gk, m = receiver_grads(lm, sub, vector, alpha * (k + 0.5) / steps, graph)
            gbar = gk if gbar is None else gbar + gk
        assert gbar is not None
        gbar = gbar / steps
        with torch.no_grad():
            with steering(lm, vector, alpha):
                mc += float(metric(forward(lm, sub), sub).sum())
            edges += torch.einsum("bpud,bpvd->uv", (clean - corr).double(), gbar.double())
            gsum += gbar.sum((0, 1, 2)).double()
    edges = torch.where(graph.valid, edges, torch.zeros_like(edges)) / n
    r = alpha * gsum / n
    return Attribution(graph=graph, edges=edges.float(), nodes=edges.sum(1).float(),
                       ie_vec=(s.double() * r).float(), mean_grad=r.float(), m_clean=mc / n, m_corrupt=mk / n,
                       n_samples=n)


def _rows(pb: PatchBatch, sl: slice) -> PatchBatch:
    return PatchBatch(pb.ids[sl], pb.attn[sl], pb.pos_ids[sl], pb.y_steer[sl], pb.y_base[sl], pb.mask[sl],
                      pb.texts[sl])
