"""A custom attention function, registered through transformers' attention interface.

Pattern hooks (site ``attn.pattern``) need the attention probabilities, which fused kernels never
materialise. :func:`add_pattern_hook` therefore switches the model's configs to the attention
implementation ``"steerscope"`` and records the hook on the attention module. That function, for
a module with a hook *active in the calling thread/task*, computes attention with the model's own
eager implementation, hands the probabilities [batch head query key] to the hook(s) in order, and,
if a hook returns a tensor, mixes the values with those probabilities instead.

State is per model and reference counted, so it is restored in any exit order: the first hook on
a model saves each config's ``_attn_implementation`` and the last removal puts it back. A forward
pass from a thread or task that holds no pattern hook on the model (a concurrent, unrelated
``generate``) is dispatched to the saved original mask and attention functions, so it computes
exactly what it would without steerscope. No model code is copied.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "steerscope"
PatternFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class Scope(Protocol):
    """Who installed a hook; ``active()`` is true in the thread/task that entered its context."""

    def active(self) -> bool: ...


@dataclass
class _Entry:
    scope: Scope
    fn: PatternFn


@dataclass
class _Swap:
    """One config switched to this implementation: its original and who holds the switch."""

    config: Any
    original: str | None
    scopes: list[Scope] = field(default_factory=list)


_LOCK = threading.Lock()
_SWAPS: dict[int, _Swap] = {}  # id(config) -> state, only while some hook holds it


class PatternHandle:
    """Removes one pattern hook; idempotent, so any exit path may call it."""

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        if self._remove is not None:
            fn, self._remove = self._remove, None
            fn()


def _configs(model: torch.nn.Module) -> list[Any]:
    out: list[Any] = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def add_pattern_hook(model: torch.nn.Module, module: torch.nn.Module, fn: PatternFn, scope: Scope) -> PatternHandle:
    """Attach ``fn(probs) -> probs' | None`` to attention ``module`` of ``model`` for ``scope``.

    Only :mod:`steerscope.hooks` calls this. Returns a handle whose ``remove()`` undoes exactly
    this hook (and the implementation switch, when it was the model's last pattern hook).
    """
    entry = _Entry(scope, fn)
    with _LOCK:
        configs = _configs(model)
        for cfg in configs:
            swap = _SWAPS.get(id(cfg))
            if swap is None:
                swap = _SWAPS[id(cfg)] = _Swap(cfg, cfg._attn_implementation)
                cfg._attn_implementation = NAME
            swap.scopes.append(scope)
        entries: list[_Entry] = module.__dict__.setdefault("_steerscope_pattern", [])
        entries.append(entry)

    def remove() -> None:
        with _LOCK:
            if entry in entries:
                entries.remove(entry)
            if not entries and module.__dict__.get("_steerscope_pattern") is entries:
                del module.__dict__["_steerscope_pattern"]
            for cfg in configs:
                swap = _SWAPS[id(cfg)]
                swap.scopes.remove(scope)
                if not swap.scopes:
                    cfg._attn_implementation = swap.original
                    del _SWAPS[id(cfg)]

    return PatternHandle(remove)


def pattern_hook_count(module: torch.nn.Module) -> int:
    """Number of pattern hooks on ``module`` (for leak tests)."""
    return len(module.__dict__.get("_steerscope_pattern", ()))


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch kv_head key d_head] -> [batch head key d_head]."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def steerscope_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch head query d_head]
    key: torch.Tensor,  # [batch kv_head key d_head]
    value: torch.Tensor,  # [batch kv_head key d_head]
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention with the caller's probability hooks where it has any, else the original."""
    eager: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = \
        sys.modules[type(module).__module__].eager_attention_forward
    entries = [e for e in module.__dict__.get("_steerscope_pattern", ()) if e.scope.active()]
    if not entries:
        config = getattr(module, "config", None)
        swap = _SWAPS.get(id(config))
        if swap is not None and not any(s.active() for s in swap.scopes):  # someone else's forward
            original = ALL_ATTENTION_FUNCTIONS.get_interface(swap.original, eager)  # type: ignore[arg-type]
            return original(module, query, key, value, attention_mask, **kwargs)  # type: ignore[no-any-return]
        if kwargs.get("softcap") is not None:  # Gemma 2: SDPA has no logit soft-capping
            return eager(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, probs = eager(module, query, key, value, attention_mask, **kwargs)
    assert probs is not None
    cur, changed = probs, False
    for e in entries:
        new = e.fn(cur)
        if new is not None:
            cur, changed = new, True
    if not changed:
        return out, probs
    n_rep = query.shape[1] // value.shape[1]
    out = torch.matmul(cur.to(value.dtype), _repeat_kv(value, n_rep)).transpose(1, 2).contiguous()
    return out, cur


def steerscope_mask(*args: Any, **kwargs: Any) -> Any:
    """Additive float masks for the caller's eager path; the original mask for anyone else."""
    swap = _SWAPS.get(id(kwargs.get("config")))
    if swap is not None and not any(s.active() for s in swap.scopes):
        original: Any = AttentionMaskInterface._global_mapping.get(swap.original or "")
        return None if original is None else original(*args, **kwargs)
    return eager_mask(*args, **kwargs)


AttentionInterface.register(NAME, steerscope_attention)
AttentionMaskInterface.register(NAME, steerscope_mask)
