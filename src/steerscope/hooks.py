"""The only module that registers PyTorch hooks.

:func:`attached` takes ``{site: fn}`` and installs, for each site, the hook that exposes that
tensor to ``fn``. ``fn(x, call)`` receives the tensor in the site's documented shape (see
:mod:`steerscope.sites`) and a :class:`Call` describing the current forward call; it returns a
replacement tensor of the same shape, or ``None`` to leave the value unchanged. Every hook is
removed in ``finally``, and the model's attention implementation is restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from steerscope.errors import SiteError
from steerscope.models import attention as _attention
from steerscope.models.load import LM
from steerscope.sites import Site

HookFn = Callable[[torch.Tensor, "Call"], "torch.Tensor | None"]


@dataclass
class Call:
    """Facts about the forward call in progress, shared by all hooks of one :func:`attached`.

    Attributes:
        mask: attention mask of the whole sequence so far [batch total_pos] (ones if none given).
        n_new: number of positions in this call (the ``pos`` length the hooks see).
        past: number of cached positions before this call (0 for a prefill).
        index: how many forward calls came before this one inside the context.
    """

    mask: torch.Tensor | None = None
    n_new: int = 0
    past: int = 0
    index: int = -1
    prompt_mask: torch.Tensor | None = None  # mask of the prefill call [batch prompt_pos]
    store: dict[str, Any] = field(default_factory=dict)

    @property
    def is_prefill(self) -> bool:
        return self.past == 0

    def begin(self, mask: torch.Tensor, n_new: int, past: int) -> None:
        """Start the record of a new forward call (the model's top-level pre-hook calls this; so
        does a caller that runs the blocks itself, e.g. :mod:`steerscope.freeze`)."""
        self.mask, self.n_new, self.past = mask, n_new, past
        self.index += 1
        if past == 0:
            self.prompt_mask = mask
        self.store.clear()

    def new_mask(self) -> torch.Tensor:
        """Mask of the positions in this call [batch pos]."""
        assert self.mask is not None
        return self.mask[:, -self.n_new :]


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _fused_split(lm: LM, out: torch.Tensor, which: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Split a fused qkv output into one part [batch pos head d_head] and a function to put it back."""
    fam, H, dh = lm.family, lm.n_heads, lm.d_head
    b, p, _ = out.shape
    i = "qkv".index(which)
    if fam.qkv == "fused_gpt2":
        d = H * dh
        part = out[..., i * d : (i + 1) * d].reshape(b, p, H, dh)

        def put(new: torch.Tensor) -> torch.Tensor:
            o = out.clone()
            o[..., i * d : (i + 1) * d] = new.reshape(b, p, d)
            return o
    else:  # fused_neox: [b p H 3 dh]
        view = out.reshape(b, p, H, 3, dh)
        part = view[..., i, :]

        def put(new: torch.Tensor) -> torch.Tensor:
            o = view.clone()
            o[..., i, :] = new
            return o.reshape(b, p, -1)
    return part, put


def _install(lm: LM, site: Site, fn: HookFn, call: Call, handles: list, patterns: list) -> None:
    """Register the hook(s) that expose ``site`` to ``fn``."""
    fam, L = lm.family, site.layer
    point = site.point
    if point == "embed" or point == "logits":
        mod = lm.module(None, fam.embed if point == "embed" else fam.unembed)

        def post(_m: Any, _a: Any, out: Any) -> Any:
            new = fn(_first(out), call)
            return None if new is None else _replace_first(out, new)

        handles.append(mod.register_forward_hook(post))
        return
    assert L is not None
    block = lm.blocks[L]
    if point == "resid_pre":

        def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                new = fn(args[0], call)
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"], call)
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    elif point == "resid_post":

        def post(_m: Any, _a: Any, out: Any) -> Any:
            new = fn(_first(out), call)
            return None if new is None else _replace_first(out, new)

        handles.append(block.register_forward_hook(post))
    elif point in ("attn_out", "resid_mid"):
        mod = lm.module(L, fam.post_attn_norm or fam.attn)
        key = f"resid_pre.{L}"
        if point == "resid_mid":
            # resid_mid = resid_pre + attn_out; a write is folded back into attn_out so that it
            # reaches the residual stream exactly as written.
            def grab(_m: Any, args: tuple, kwargs: dict) -> None:
                call.store[key] = args[0] if args else kwargs["hidden_states"]

            handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))

            def post(_m: Any, _a: Any, out: Any) -> Any:
                a = _first(out)
                mid = call.store[key] + a
                new = fn(mid, call)
                return None if new is None else _replace_first(out, new - call.store[key])
        else:

            def post(_m: Any, _a: Any, out: Any) -> Any:
                new = fn(_first(out), call)
                return None if new is None else _replace_first(out, new)

        handles.append(mod.register_forward_hook(post))
    elif point == "mlp_out":
        mod = lm.module(L, fam.post_mlp_norm or fam.mlp)

        def post(_m: Any, _a: Any, out: Any) -> Any:
            new = fn(_first(out), call)
            return None if new is None else _replace_first(out, new)

        handles.append(mod.register_forward_hook(post))
    elif point == "mlp_in":
        mod = lm.module(L, fam.mlp)

        def pre(_m: Any, args: tuple, kwargs: dict) -> Any:
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x, call)
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    elif point in ("attn.q", "attn.k", "attn.v"):
        which = point[-1]
        mod = lm.module(L, getattr(fam, f"{which}_proj"))

        def post(_m: Any, _a: Any, out: torch.Tensor) -> Any:
            if fam.qkv == "separate":
                b, p, _ = out.shape
                part = out.view(b, p, -1, lm.d_head)
                new = fn(part, call)
                return None if new is None else new.reshape(b, p, -1)
            part, put = _fused_split(lm, out, which)
            new = fn(part, call)
            return None if new is None else put(new)

        handles.append(mod.register_forward_hook(post))
    elif point == "attn.z":
        mod = lm.module(L, fam.o_proj)

        def pre(_m: Any, args: tuple) -> Any:
            x = args[0]
            b, p, _ = x.shape
            new = fn(x.view(b, p, lm.n_heads, lm.d_head), call)
            return None if new is None else (new.reshape(b, p, -1), *args[1:])

        handles.append(mod.register_forward_pre_hook(pre))
    elif point == "attn.pattern":
        mod = lm.module(L, fam.attn)
        if getattr(mod, "_steerscope_pattern", None) is not None:
            raise SiteError(f"{site} already has a pattern hook; nest recording inside one context instead")
        mod._steerscope_pattern = lambda probs: fn(probs, call)
        patterns.append(mod)
    else:  # pragma: no cover - Site validates points
        raise SiteError(f"unsupported site {site}")


@contextmanager
def attached(lm: LM, hooks: Mapping[str | Site, HookFn | list[HookFn]]) -> Iterator[Call]:
    """Attach ``{site: fn}`` hooks for the duration of the block; always removed on exit.

    Args:
        lm: the model.
        hooks: site (``"blocks.6.resid_pre"`` or :class:`Site`) to a function or list of functions
            ``fn(x, call) -> x' | None``.

    Yields:
        The shared :class:`Call` record (mask and cache facts of the forward call in progress).

    Example:
        >>> with attached(lm, {"blocks.3.resid_pre": lambda x, c: x * 0}):
        ...     lm.model(**batch)
    """
    call = Call()
    handles: list = []
    patterns: list = []
    configs: list[tuple[Any, Any]] = []

    def top_pre(_m: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        x = ids if ids is not None else emb
        b, n = x.shape[0], x.shape[1]
        pkv = kwargs.get("past_key_values")
        past = int(pkv.get_seq_length()) if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(b, past + n, dtype=torch.long, device=x.device)
        call.begin(mask, n, past)

    try:
        handles.append(lm.model.register_forward_pre_hook(top_pre, with_kwargs=True))
        for name, fns in hooks.items():
            site = Site.parse(name).check(lm.n_layers) if not isinstance(name, Site) else name.check(lm.n_layers)
            for fn in fns if isinstance(fns, list) else [fns]:
                _install(lm, site, fn, call, handles, patterns)
        if patterns:
            for m in lm.model.modules():
                cfg = getattr(m, "config", None)
                if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c, _ in configs):
                    configs.append((cfg, cfg._attn_implementation))
            for cfg, _ in configs:
                cfg._attn_implementation = _attention.NAME
        yield call
    finally:
        for h in handles:
            h.remove()
        for m in patterns:
            m._steerscope_pattern = None
            del m._steerscope_pattern
        for cfg, impl in configs:
            cfg._attn_implementation = impl


@dataclass
class BlockCall:
    """What one block was called with: the residual stream entering it and the other arguments."""

    hidden: torch.Tensor  # [batch pos d_model]
    args: tuple  # positional arguments after the hidden states (usually none)
    kwargs: dict[str, Any]  # attention mask, rotary embeddings, position ids, ... as the model passed them


@contextmanager
def block_inputs(lm: LM, layers: Sequence[int]) -> Iterator[dict[int, BlockCall]]:
    """Record, for each block in ``layers``, what the model calls it with (the last call wins).

    Lets a caller run blocks ``l..`` again on other residual streams exactly as the model would
    (see :mod:`steerscope.suffix`) without re-implementing masks or rotary embeddings. A cache is
    never kept: ``past_key_values`` is recorded as None and ``use_cache`` as False.

    Example:
        >>> with block_inputs(lm, [6, 7]) as calls:
        ...     lm.model(**batch)
        >>> calls[6].kwargs["position_embeddings"]
    """
    seen: dict[int, BlockCall] = {}
    handles: list = []

    def rec(layer: int) -> Callable[..., None]:
        def pre(_m: Any, args: tuple, kwargs: dict) -> None:
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if "past_key_values" in kw:
                kw["past_key_values"] = None
            if "use_cache" in kw:
                kw["use_cache"] = False
            x = args[0] if args else kwargs["hidden_states"]
            seen[layer] = BlockCall(x, tuple(args[1:]), kw)
        return pre

    try:
        for layer in layers:
            handles.append(lm.blocks[layer].register_forward_pre_hook(rec(layer), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


def hook_count(model: torch.nn.Module) -> int:
    """Total number of forward / pre-forward hooks registered on any submodule (for leak tests)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += int(getattr(m, "_steerscope_pattern", None) is not None)
    return n
