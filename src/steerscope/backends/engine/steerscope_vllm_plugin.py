"""Graph-safe steering sites for a *compiled* vLLM model (a ``vllm.general_plugins`` plugin).

Hooks added after vLLM has compiled the model (torch.compile; CUDA graphs on GPU) never run: the
compiled graph was traced without them. This plugin puts the steering into the graph instead,
while the model is built, before anything is traced:

- vLLM loads the plugin in every engine and worker process (entry point ``vllm.general_plugins``,
  declared by the ``steerscope_vllm_plugin-*.dist-info`` folder beside this file, which the engine
  environment has on its ``PYTHONPATH``). It acts only when ``$STEERSCOPE_VLLM_GRAPH`` names the
  model's architectures (the launchers set it from the model's config.json); then it registers,
  through vLLM's public ``ModelRegistry.register_model``, a subclass of each named architecture.
- The subclass, after building the model, gives every decoder layer two persistent buffers and a
  forward pre-hook (traced into the graph with the layer):
  ``idx [max_tokens]`` (int64, shared): the steering row of each token of the step (0 = none);
  ``table [rows d_model]`` (per layer; a view of one ``[layers rows d_model]`` tensor): row 0 is
  zero, rows ``1 + 2i`` / ``2 + 2i`` hold request i's delta for its prompt / generated tokens.
  The hook computes ``residual + table[idx[:n]]`` (``hidden + ...`` at layer 0), branch-free, so the
  traced graph reads whatever the buffers hold at replay. With ``ablate`` in the variable's value, a
  per-row unit direction ``rtable [rows d_model]`` is projected out of resid_pre, attn_out and mlp_out.
- The final norm (``model.model.norm(hidden, residual)``) gets the same pre-hook on ``table[n_layers]`` (the table
  has one row block more than the model has layers): steering the stream leaving the last block, where ``mlp_out`` /
  ``resid_post`` of the last block land. Plain additions only: a gated request steering there needs the eager engine.
- With ``gates`` in the variable's value, conditions run in the graph too (up to :data:`LEAVES` per request,
  ``on="prompt"`` or ``on="token"``, combined by any and/or/not, in up to :data:`RULES` rules, first match wins;
  ``steerscope_vllm_gates.compiled_refusal`` says what else needs the eager engine). Each gated request holds a slot
  ``1..S`` (0: ungated, always open) with its leaves' unit directions ``gdir [S K d]``, parameters ``gparam [S K
  6]`` (center·d̂, scale, threshold, layer, reduce, on), running state ``gstate [S K 5]`` (sum, count, max,
  decision, decided) and the truth table of its gate over the leaves' decisions ``gtt [S RULES 2^K]`` (one table per
  rule); per token ``gslot`` (its slot), ``gtok`` (prompt token of a gated request, last prompt token) and ``gtdec
  [tokens K]`` (its token leaves' decisions). Each layer's hook scores every token on its slot's leaves, reduces the
  prompt tokens per slot (``index_add`` / ``scatter_reduce``) and, for token leaves, every token's running mean /
  max over its request so far (segment sums of the step's flattened tokens plus the carry), updates the state of the
  leaves read at that layer with ``copy_`` (kept across steps: a prompt decision made in the prefill step holds for
  the request's life) and gives each token its first open rule's delta (:func:`_rule_weights`: ``table[idx]`` for the
  first rule, the slot's ``gxtab [layers S RULES-1 d]`` rows for the others, where ``gpos [S 2]`` lets them act),
  branch-free; a slot whose prompt leaves are not all decided (a prompt split over steps) is shut. A slot's
  projection clamp (``gclamp [layers S d]`` unit directions, ``gcb [S 4]`` lo, hi and its positions, ``gctt`` its
  gate's truth table) is applied after the additions with ``torch.where`` (:func:`_clamp_math`). All of a layer's
  gated part is one custom operator in the traced graph, ``steerscope::gated_add`` (:func:`gated_add`), whose body
  runs as eager tensor code: Inductor does not compile the gate kernels of each layer (that took most of a compiled
  engine's start), and the layer's index is a buffer, so every layer traces the same graph. On CPU the operator
  reads ``gany`` (some token of the step is gated) and a step without a gated request takes the plain add; on a
  gated step the first layer works out every token's rule weights and clamp gate and the layers above reuse them,
  recomputing only where a leaf is read (a leaf's decision can change them there). On CUDA its body stays
  branch-free and every layer runs all of it (a predicate read on the host would sync inside a captured CUDA
  graph).
- Each step, the worker extension (``steerscope_vllm_adapter``), from an eager pre-hook on the
  outer model (which vLLM does not compile), writes ``idx`` and, when the batch's requests or
  their specs changed, the table rows, with ``copy_()`` (same storage, so the graph sees them).

Costs: one gather-add per layer per token on every step, steered or not (four projections per layer with
``ablate``; with ``gates``, on steps with a gated request (on CUDA: every step), a gather of K directions and a
dot product per token, a few per-slot reductions and segment sums);
buffers of ``layers x (2 max_num_seqs + 1) x d_model`` floats (gates: ``(2 max_num_seqs + 1) x K x d_model``
float32, and per layer ``(2 max_num_seqs + 1) x d_model`` float32 for clamps and ``x (RULES - 1)`` in the model's
dtype for the later rules).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

ENV = "STEERSCOPE_VLLM_GRAPH"
LEAVES = 4  # conditions per gated request in a compiled graph (the truth table has 2**LEAVES entries)
RULES = 3  # rules per gated request in a compiled graph (first match wins; rules 2.. keep their delta per slot)
log = logging.getLogger("steerscope.vllm")


def wanted() -> tuple[list[str], bool, bool]:
    """(architectures to wrap, with ablation sites, with gate sites) from ``$STEERSCOPE_VLLM_GRAPH``
    ("Arch1,Arch2[;ablate][,gates]")."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return [], False, False
    archs, _, opts = raw.partition(";")
    flags = opts.split(",")
    return [a for a in archs.split(",") if a], "ablate" in flags, "gates" in flags


def register() -> None:
    """vLLM's plugin entry point: register the steered subclass of each architecture in $STEERSCOPE_VLLM_GRAPH."""
    archs, ablate, gates = wanted()
    if not archs:
        return
    from steerscope_vllm_adapter import check_version
    from vllm import ModelRegistry

    check_version()
    for arch in archs:
        base = ModelRegistry._try_load_model_cls(arch)  # the one private call: the class vLLM would build
        if base is None:
            raise RuntimeError(f"steerscope: vLLM has no model class for architecture {arch!r}")
        if getattr(base, "_steerscope_graph", False):
            continue
        ModelRegistry.register_model(arch, steered_class(base, ablate, gates))


def steered_class(base: type, ablate: bool, gates: bool = False) -> type:
    """``base`` with graph-safe steering sites added after ``__init__`` (same name, weights, interfaces)."""

    def __init__(self: Any, *, vllm_config: Any, prefix: str = "") -> None:  # vLLM inspects this signature
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)  # type: ignore[misc]
        add_sites(self, vllm_config, ablate, gates)

    return type(base.__name__, (base,), {"__init__": __init__, "_steerscope_graph": True,
                                         "__module__": base.__module__, "__qualname__": base.__qualname__})


class GraphSites:
    """The buffers of one model (kept on the model as ``_steerscope_sites``; written by the extension)."""

    def __init__(self, n_layers: int, rows: int, max_tokens: int, d: int, dtype: torch.dtype,
                 device: torch.device, ablate: bool, gates: bool = False) -> None:
        self.rows, self.max_tokens, self.ablate = rows, max_tokens, ablate
        # one more than the blocks: table[n_layers] steers the final norm's input (the stream leaving the last block)
        self.table = torch.zeros(n_layers + 1, rows, d, dtype=dtype, device=device)
        self.idx = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.rtable = torch.zeros(rows, d, dtype=dtype, device=device) if ablate else None
        self.gates = gates
        if gates:  # slots 0..rows-1; slot 0 is the ungated one: no leaves, decided, its table all open
            f32 = torch.float32
            self.gslot = torch.zeros(max_tokens, dtype=torch.int64, device=device)
            self.gtok = torch.zeros(max_tokens, 2, dtype=f32, device=device)
            self.gdir = torch.zeros(rows, LEAVES, d, dtype=f32, device=device)
            self.gparam = torch.zeros(rows, LEAVES, 6, dtype=f32, device=device)
            self.gparam[..., 1], self.gparam[..., 3] = 1.0, -1.0  # scale 1, read at no layer
            self.gstate = torch.zeros(rows, LEAVES, 5, dtype=f32, device=device)
            self.gstate[..., 4] = 1.0  # decided (an empty slot gates nothing)
            self.gtt = torch.zeros(rows, RULES, 2**LEAVES, dtype=f32, device=device)  # per slot, each rule's table
            self.gtt[0, 0] = 1.0
            # rules after the first: per layer and slot each rule's delta (the first rule's is the request's row of
            # ``table``), and per slot whether they steer its prompt / generated tokens
            self.gxtab = torch.zeros(n_layers, rows, RULES - 1, d, dtype=dtype, device=device)
            self.gpos = torch.zeros(rows, 2, dtype=f32, device=device)
            self.gtdec = torch.zeros(max_tokens, LEAVES, dtype=f32, device=device)  # token leaves' decisions
            self.gany = torch.zeros((), dtype=torch.bool, device=device)  # some token of this step is gated
            # CPU: this step's [tokens, layers where a leaf is read, (rule weights, clamp keep) or None], made by the
            # step's first layer (``gfirst``) and reused by the layers above it (see _gated_add_impl)
            self.gmemo: list[Any] | None = None
            self.gfirst = -1
            # projection clamps: per layer and slot the unit direction (0: none), per slot lo, hi, whether prompt /
            # generated tokens are clamped, and the truth table of the clamp's own gate
            self.gclamp = torch.zeros(n_layers, rows, d, dtype=f32, device=device)
            self.gcb = torch.zeros(rows, 4, dtype=f32, device=device)
            self.gctt = torch.zeros(rows, 2**LEAVES, dtype=f32, device=device)


_GATES: dict[int, tuple[GraphSites, int]] = {}  # a layer's index buffer's address -> (its model's sites, the layer)


def add_sites(model: Any, vllm_config: Any, ablate: bool, gates: bool = False) -> GraphSites:
    """Buffers and pre-hooks on every decoder layer of ``model`` (before it is compiled)."""
    layers = model.model.layers
    sched = vllm_config.scheduler_config
    max_tokens = int(sched.max_num_batched_tokens) + int(sched.max_num_seqs) + 64  # room for padded batches
    rows = 2 * int(sched.max_num_seqs) + 1
    d = int(vllm_config.model_config.get_hidden_size())
    dtype = vllm_config.model_config.dtype
    device = next(model.parameters()).device
    sites = GraphSites(len(layers), rows, max_tokens, d, dtype, device, ablate, gates)
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        layer.register_buffer("steerscope_idx", sites.idx, persistent=False)
        layer.register_buffer("steerscope_table", sites.table[i], persistent=False)
        if gates:
            # the layer's index as a buffer, the one gate tensor the graph passes to the operator: every layer traces
            # the same graph, and the operator finds the layer's gate state by this buffer's address (_GATES)
            glayer = torch.tensor(float(i), device=device)
            layer.register_buffer("steerscope_glayer", glayer, persistent=False)
            _GATES[glayer.data_ptr()] = (sites, i)
            if sites.gfirst < 0:  # the first layer of this model (of this rank's stage under pipeline parallelism)
                sites.gfirst = i
            # CPU: the gate arithmetic skipped on steps without a gated request; on CUDA it stays branch-free (a
            # host-side predicate would sync inside a captured CUDA graph)
            layer.steerscope_skip = device.type == "cpu"
        layer.register_forward_pre_hook(_layer_hook, with_kwargs=True)
        if ablate:
            layer.register_buffer("steerscope_rtable", sites.rtable, persistent=False)
            for sub in ("self_attn", "mlp"):
                m = getattr(layer, sub)
                m.register_buffer("steerscope_idx", sites.idx, persistent=False)
                m.register_buffer("steerscope_rtable", sites.rtable, persistent=False)
                m.register_forward_hook(_out_hook)
    from steerscope_vllm_adapter import final_norm

    norm = final_norm(model)
    if norm is not None:  # steering "layer n_layers": the final norm's input, ungated (gated requests there: eager)
        norm.register_buffer("steerscope_idx", sites.idx, persistent=False)
        norm.register_buffer("steerscope_table", sites.table[len(layers)], persistent=False)
        norm.register_forward_pre_hook(_norm_hook)
    model._steerscope_sites = sites
    log.info("steerscope: graph-safe steering sites on %d layers (rows %d, tokens %d, ablate %s, gates %s)",
             len(layers), rows, max_tokens, ablate, gates)
    return sites


def _project(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x - (x * r).sum(-1, keepdim=True) * r


def _layer_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    positions, hidden = args[0], args[1]
    residual = args[2] if len(args) > 2 else kwargs.pop("residual", None)
    idx = module.steerscope_idx[: hidden.shape[0]]
    delta = module.steerscope_table[idx].to(hidden.dtype)
    if getattr(module, "steerscope_glayer", None) is not None:
        hidden, residual = gated_add(module, hidden, residual, delta)
    elif residual is None:
        hidden = hidden + delta
    else:
        residual = residual + delta.to(residual.dtype)
    rtable = getattr(module, "steerscope_rtable", None)
    if rtable is not None:
        r = rtable[idx]
        hidden = _project(hidden, r.to(hidden.dtype))
        if residual is not None:
            residual = _project(residual, r.to(residual.dtype))
    kwargs.pop("residual", None)
    return (positions, hidden, residual, *args[3:]), kwargs


def _norm_hook(module: Any, args: tuple[Any, ...]) -> Any:
    """``norm(hidden, residual)`` adds the two before normalising: the delta goes into ``residual`` (``hidden``
    when called without one), branch-free on the buffers like :func:`_layer_hook`."""
    hidden = args[0]
    delta = module.steerscope_table[module.steerscope_idx[: hidden.shape[0]]]
    if len(args) < 2 or args[1] is None:
        return (hidden + delta.to(hidden.dtype), *args[1:])
    return (hidden, args[1] + delta.to(args[1].dtype), *args[2:])


def _out_hook(module: Any, args: Any, out: Any) -> Any:
    if not isinstance(out, torch.Tensor):
        return None
    r = module.steerscope_rtable[module.steerscope_idx[: out.shape[0]]]
    return _project(out, r.to(out.dtype))


def gated_add(module: Any, hidden: torch.Tensor, residual: torch.Tensor | None, delta: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's gated steering, as one opaque operator of the traced graph (``steerscope::gated_add``,
    :func:`_gated_add_impl`): read the leaves at this layer, add each token's delta times its rule gate, then its
    projection clamp; the leaves' new state is written back into ``gstate`` / ``gtdec`` (kept across steps).

    Why an operator and not traced tensor code: Inductor compiled the few dozen small gate kernels of every layer
    separately, which made a compiled SmolLM2 engine start about 11.5 min instead of about 3. As an operator the
    graph holds one call per layer and the gate arithmetic runs as eager tensor code inside it. With
    ``steerscope_skip`` (CPU) a step without a gated token (``gany`` false, written by the worker) takes the plain
    add and skips the gate arithmetic; on CUDA the body is branch-free (a host-side read would sync inside a
    captured CUDA graph), so a captured graph replays the gate kernels on every step.
    """
    h, r = torch.ops.steerscope.gated_add(hidden, residual, delta, module.steerscope_glayer,
                                          bool(getattr(module, "steerscope_skip", False)))
    return h, (None if residual is None else r)


def _gated_add_impl(hidden: torch.Tensor, residual: torch.Tensor | None, delta: torch.Tensor, layer: torch.Tensor,
                    skip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of ``steerscope::gated_add``: (new hidden, new residual (empty at layer 0)). ``layer`` is the
    layer's index buffer; the layer's gate state is found by its address, as vLLM's attention operator finds its
    KV cache by the layer's name (a graph holds one tensor argument per layer instead of fourteen: each argument
    costs a size check and dispatch time on every step). It writes the leaves' state (``gstate``, ``gtdec``) in
    place; its outputs never alias its inputs (an operator's contract)."""
    found = _GATES.get(layer.data_ptr())
    if found is None:
        raise RuntimeError("steerscope: this layer has no gate sites (steerscope::gated_add called outside a model "
                           "built by steerscope_vllm_plugin.add_sites(..., gates=True))")
    sites, i = found
    if skip and not bool(sites.gany):  # CPU: no token of this step is gated, the plain add
        if residual is None:
            return hidden + delta, hidden.new_empty(0)
        return hidden.clone(), residual + delta.to(residual.dtype)
    n = hidden.shape[0]
    slot, tok, par, st, gdir, gtt = sites.gslot[:n], sites.gtok[:n], sites.gparam, sites.gstate, sites.gdir, sites.gtt
    gctt, gtdec, gclamp, gcb, gxtab, gpos = sites.gctt, sites.gtdec, sites.gclamp[i], sites.gcb, sites.gxtab[i], \
        sites.gpos
    memo: list[Any] | None = None  # CUDA: none, every layer runs all of it, branch-free (a host-side read would
    if skip:  # sync inside a captured graph); CPU: the step's gates, reused by the layers until a leaf changes them
        memo = sites.gmemo
        if i == sites.gfirst or memo is None or memo[0] != n:  # a new step (the first layer runs first)
            memo = sites.gmemo = [n, {int(v) for v in par[..., 3].flatten().tolist()}, None]
    if memo is None or i in memo[1]:  # the leaves read at this layer: the full arithmetic, their state written
        x = hidden if residual is None else hidden + residual  # resid_pre before this layer's additions
        opened, clamped, new, tnow = _gate_math(layer, x, slot, tok, par, st, gdir, gtt, gctt, gtdec[:n])
        st.copy_(new)
        gtdec[:n].copy_(tnow)
        if memo is not None:
            memo[2] = None  # the gates above this layer are these
    elif memo[2] is None:  # CPU, no leaf here: the gates held in the state (what the arithmetic gives here)
        opened, clamped = _table_gates(slot, par[slot][..., 5] > 0, gtdec[:n], st[..., 3], st[..., 4], gtt, gctt)
    w: torch.Tensor | None
    keep: torch.Tensor | None
    if memo is None or memo[2] is None:
        w0, w = _rule_weights(opened, slot, tok, gpos, delta.dtype)
        keep = _clamp_keep(slot, tok, gcb, clamped)
        if memo is not None:  # CPU: kept for the layers above, None where no token takes it (skipped below)
            memo[2] = (w0, w if bool(w.any()) else None, keep if bool(keep.any()) else None)
    if memo is not None:
        w0, w, keep = memo[2]
    d = delta * w0 if w is None else delta * w0 + (gxtab[slot] * w[..., None]).sum(1)
    h, r = (hidden + d, None) if residual is None else (hidden, residual + d.to(residual.dtype))
    if keep is not None:
        h, r = _clamp_math(h, r, slot, gclamp, gcb, keep)
    if h is hidden:
        h = h.clone()
    return h, (hidden.new_empty(0) if r is None else r)


def _gated_add_fake(hidden: torch.Tensor, residual: torch.Tensor | None, *args: Any) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    return torch.empty_like(hidden), (hidden.new_empty(0) if residual is None else torch.empty_like(residual))


_SCHEMA = "gated_add(Tensor hidden, Tensor? residual, Tensor delta, Tensor layer, bool skip) -> (Tensor, Tensor)"
_LIB: list[torch.library.Library] = []  # kept alive: the registration lasts as long as its Library object


def _define_op() -> None:
    """Register ``steerscope::gated_add`` once per process (another copy of this module may have done it).

    Registered with ``torch.library.Library`` (schema, one CompositeExplicitAutograd kernel, a fake for tracing), not
    ``torch.library.custom_op``: the latter's Python wrapper cost about 150 us per call here (measured, 2 threads),
    about 5 ms per step over 30 layers; this dispatch costs about 10 us. The operator declares no mutated argument:
    the state it writes is not an argument (see :func:`_gated_add_impl`), it is read by no other node of the graph,
    and each layer's call takes the previous layer's output, so the calls run in layer order."""
    if hasattr(torch.ops.steerscope, "gated_add"):
        return
    lib = torch.library.Library("steerscope", "FRAGMENT")  # type: ignore[no-untyped-call]
    lib.define(_SCHEMA)  # type: ignore[no-untyped-call]
    lib.impl("gated_add", _gated_add_impl, "CompositeExplicitAutograd")  # type: ignore[no-untyped-call]
    torch.library.register_fake("steerscope::gated_add", _gated_add_fake, lib=lib)
    _LIB.append(lib)


_define_op()


def _rule_weights(opened: torch.Tensor, slot: torch.Tensor, tok: torch.Tensor, gpos: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's weight on its slot's rules, first match wins: rule r acts where its gate is open and every
    earlier rule's is shut (``opened`` [n RULES], 0/1). Returns the first rule's weight [n 1] (on the token's row of
    ``table``) and the later rules' [n RULES-1] (on ``gxtab`` [S RULES-1 d], where ``gpos`` lets them steer the
    token: prompt or generated). At most one weight of a token is nonzero, so its delta is that rule's exactly."""
    shut = torch.cumprod(1.0 - opened, -1)  # [n R]: rules up to r all shut
    first = opened * torch.cat([torch.ones_like(opened[:, :1]), shut[:, :-1]], -1)  # [n R]
    keep = torch.where(tok[:, 0] > 0, gpos[slot, 0], gpos[slot, 1])  # [n]
    return first[:, :1].to(dtype), (first[:, 1:] * keep[:, None]).to(dtype)


def _clamp_keep(slot: torch.Tensor, tok: torch.Tensor, gcb: torch.Tensor, opened: torch.Tensor) -> torch.Tensor:
    """[n]: 1 where the token's clamp may act, its positions select it (``gcb`` [S 4]: lo, hi, prompt, generated)
    and its clamp gate (``opened`` [n]) is open."""
    cb = gcb[slot]
    return torch.where(tok[:, 0] > 0, cb[:, 2], cb[:, 3]) * opened


def _clamp_math(hidden: torch.Tensor, residual: torch.Tensor | None, slot: torch.Tensor, gclamp: torch.Tensor,
                gcb: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each token's projection clamp at this layer, ``x + (clip(x·r̂, lo, hi) − x·r̂) r̂`` with x = resid_pre after
    the additions, where its slot has a direction here and ``keep`` (:func:`_clamp_keep`) allows it: the clamped
    stream is written whole into ``residual`` with ``hidden`` 0 there (into ``hidden`` at layer 0), as the eager
    worker does; every other token's tensors are left as they were."""
    cb = gcb[slot]  # [n 4]
    r = gclamp[slot]  # [n d]
    mask = ((keep > 0) & (r != 0).any(-1))[:, None]
    x = hidden if residual is None else hidden + residual
    rr = r.to(x.dtype)
    p = (x * rr).sum(-1)
    c = torch.minimum(torch.maximum(p, cb[:, 0].to(x.dtype)), cb[:, 1].to(x.dtype))
    new = x + (c - p)[:, None] * rr
    if residual is None:
        return torch.where(mask, new, hidden), None
    return torch.where(mask, torch.zeros_like(hidden), hidden), torch.where(mask, new.to(residual.dtype), residual)


def _gate_math(layer: float | torch.Tensor, x: torch.Tensor, slot: torch.Tensor, tok: torch.Tensor, par: torch.Tensor,
               st: torch.Tensor, gdir: torch.Tensor, gtt: torch.Tensor, gctt: torch.Tensor, tprev: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's gates at this layer, without side effects: (each rule's gate open [n RULES], clamp gate open
    [n], the leaves' new running state [S K 5], the token leaves' decisions [n K]).

    A token's gate is 1 where its slot's rule (or clamp) gate is open and decided. A prompt leaf (``on="prompt"``)
    is one decision per slot, made at the slot's last prompt token and kept; a token leaf (``on="token"``) is one
    decision per token, from the running mean / max over every token of its request up to and including it (the
    carry in ``st`` plus the request's tokens so far in this step; a request's tokens are one contiguous slice of
    the step) or the token's own score (``last``), kept in ``gtdec`` for the layers above the leaf's.
    """
    n = x.shape[0]
    mine = par[slot]  # [n K 6]
    s = (torch.einsum("nkd,nd->nk", gdir[slot], x.float()) - mine[..., 0]) / mine[..., 1]
    pm, last = tok[:, 0:1], tok[:, 1:2]
    on_tok, tok_leaf = par[..., 5] > 0, mine[..., 5] > 0  # token leaves: [S K] per slot, [n K] per token
    w = torch.where(tok_leaf, torch.ones_like(s), pm.expand_as(s))  # [n K]: the tokens each leaf reduces
    zero = torch.zeros_like(st[..., 0])  # [S K]
    total = st[..., 0] + zero.index_add(0, slot, s * w)
    count = st[..., 1] + zero.index_add(0, slot, w)
    at_last = zero.index_add(0, slot, s * last)
    ends = zero.index_add(0, slot, last.expand_as(s)) > 0  # the slot's last prompt token is in this step
    top = torch.maximum(st[..., 2], torch.full_like(zero, -math.inf).scatter_reduce(
        0, slot[:, None].expand_as(s), torch.where(w > 0, s, -math.inf), "amax"))
    reduce = par[..., 4]
    value = torch.where(reduce == 0, total / count.clamp_min(1.0), torch.where(reduce == 1, at_last, top))
    here = par[..., 3] == layer
    decide = here & ends & ~on_tok
    dec = torch.where(decide, (value > par[..., 2]).float(), st[..., 3])
    done = torch.where(decide, torch.ones_like(zero), st[..., 4])
    # token leaves: per token, the running reduction over its request's tokens up to it (segment sums in float64)
    ar = torch.arange(n, device=x.device)
    first = torch.full((zero.shape[0],), n, dtype=ar.dtype, device=x.device).scatter_reduce(0, slot, ar, "amin")[slot]
    thr = mine[..., 2]

    def upto(v: torch.Tensor) -> torch.Tensor:  # [n K]: sum of v over the token's request's tokens up to it
        vd = v.double()
        c = torch.cumsum(vd, 0)
        return (c - (c[first] - vd[first])).float()

    prev = st[slot]  # [n K 5]: the carry from earlier steps
    mean_t = (prev[..., 0] + upto(s)) / (prev[..., 1] + (ar - first + 1).float()[:, None])
    max_t = (prev[..., 2] > thr) | (upto((s > thr).float()) > 0)
    tdec = torch.where(mine[..., 4] == 0, mean_t > thr, torch.where(mine[..., 4] == 1, s > thr, max_t)).float()
    tnow = torch.where(mine[..., 3] == layer, tdec, tprev)
    new = torch.stack([torch.where(here, total, st[..., 0]), torch.where(here, count, st[..., 1]),
                       torch.where(here, top, st[..., 2]), dec, done], -1)
    return (*_table_gates(slot, tok_leaf, tnow, dec, done, gtt, gctt), new, tnow)


def _table_gates(slot: torch.Tensor, tok_leaf: torch.Tensor, tnow: torch.Tensor, dec: torch.Tensor,
                 done: torch.Tensor, gtt: torch.Tensor, gctt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's rule gates [n RULES] and clamp gate [n] from its leaves' decisions: ``tnow`` [n K] for token
    leaves (``tok_leaf`` [n K]), the slot's ``dec`` [S K] for prompt leaves, looked up in the slot's truth tables;
    shut (0) where the slot's prompt leaves are not all decided (``done`` [S K])."""
    leaf = torch.where(tok_leaf, tnow, dec[slot])  # [n K]: each token's leaf decisions
    bits = (leaf * (2 ** torch.arange(leaf.shape[1], device=leaf.device)).float()).sum(-1).long()  # [n]
    decided = done.amin(-1)[slot]
    return gtt[slot, :, bits] * decided[:, None], gctt[slot, bits] * decided
