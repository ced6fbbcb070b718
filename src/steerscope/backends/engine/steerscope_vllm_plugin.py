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
- Each step, the worker extension (``steerscope_vllm_adapter``), from an eager pre-hook on the
  outer model (which vLLM does not compile), writes ``idx`` and, when the batch's requests or
  their specs changed, the table rows, with ``copy_()`` (same storage, so the graph sees them).

Costs: one gather-add per layer per token on every step, steered or not (and four projections per
layer with ``ablate``); buffers of ``layers x (2 max_num_seqs + 1) x d_model`` floats.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

ENV = "STEERSCOPE_VLLM_GRAPH"
log = logging.getLogger("steerscope.vllm")


def wanted() -> tuple[list[str], bool]:
    """(architectures to wrap, with ablation sites) from ``$STEERSCOPE_VLLM_GRAPH`` ("Arch1,Arch2[;ablate]")."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return [], False
    archs, _, opts = raw.partition(";")
    return [a for a in archs.split(",") if a], "ablate" in opts.split(",")


def register() -> None:
    """vLLM's plugin entry point: register the steered subclass of each architecture in $STEERSCOPE_VLLM_GRAPH."""
    archs, ablate = wanted()
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
        ModelRegistry.register_model(arch, steered_class(base, ablate))


def steered_class(base: type, ablate: bool) -> type:
    """``base`` with graph-safe steering sites added after ``__init__`` (same name, weights, interfaces)."""

    def __init__(self: Any, *, vllm_config: Any, prefix: str = "") -> None:  # vLLM inspects this signature
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)  # type: ignore[misc]
        add_sites(self, vllm_config, ablate)

    return type(base.__name__, (base,), {"__init__": __init__, "_steerscope_graph": True,
                                         "__module__": base.__module__, "__qualname__": base.__qualname__})


class GraphSites:
    """The buffers of one model (kept on the model as ``_steerscope_sites``; written by the extension)."""

    def __init__(self, n_layers: int, rows: int, max_tokens: int, d: int, dtype: torch.dtype,
                 device: torch.device, ablate: bool) -> None:
        self.rows, self.max_tokens, self.ablate = rows, max_tokens, ablate
        self.table = torch.zeros(n_layers, rows, d, dtype=dtype, device=device)
        self.idx = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.rtable = torch.zeros(rows, d, dtype=dtype, device=device) if ablate else None


def add_sites(model: Any, vllm_config: Any, ablate: bool) -> GraphSites:
    """Buffers and pre-hooks on every decoder layer of ``model`` (before it is compiled)."""
    layers = model.model.layers
    sched = vllm_config.scheduler_config
    max_tokens = int(sched.max_num_batched_tokens) + int(sched.max_num_seqs) + 64  # room for padded batches
    rows = 2 * int(sched.max_num_seqs) + 1
    d = int(vllm_config.model_config.get_hidden_size())
    dtype = vllm_config.model_config.dtype
    device = next(model.parameters()).device
    sites = GraphSites(len(layers), rows, max_tokens, d, dtype, device, ablate)
    for i, layer in enumerate(layers):
        if type(layer).__name__ == "PPMissingLayer":
            continue
        layer.register_buffer("steerscope_idx", sites.idx, persistent=False)
        layer.register_buffer("steerscope_table", sites.table[i], persistent=False)
        layer.register_forward_pre_hook(_layer_hook, with_kwargs=True)
        if ablate:
            layer.register_buffer("steerscope_rtable", sites.rtable, persistent=False)
            for sub in ("self_attn", "mlp"):
                m = getattr(layer, sub)
                m.register_buffer("steerscope_idx", sites.idx, persistent=False)
                m.register_buffer("steerscope_rtable", sites.rtable, persistent=False)
                m.register_forward_hook(_out_hook)
    model._steerscope_sites = sites
    log.info("steerscope: graph-safe steering sites on %d layers (rows %d, tokens %d, ablate %s)",
             len(layers), rows, max_tokens, ablate)
    return sites


def _project(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x - (x * r).sum(-1, keepdim=True) * r


def _layer_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    positions, hidden = args[0], args[1]
    residual = args[2] if len(args) > 2 else kwargs.pop("residual", None)
    idx = module.steerscope_idx[: hidden.shape[0]]
    delta = module.steerscope_table[idx].to(hidden.dtype)
    if residual is None:
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


def _out_hook(module: Any, args: Any, out: Any) -> Any:
    if not isinstance(out, torch.Tensor):
        return None
    r = module.steerscope_rtable[module.steerscope_idx[: out.shape[0]]]
    return _project(out, r.to(out.dtype))
