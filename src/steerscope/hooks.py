"""The only module that registers PyTorch hooks.

:func:`attached` takes ``{site: fn}`` and installs, for each site, the hook that exposes that
tensor to ``fn``. ``fn(x, call)`` receives the tensor in the site's documented shape (see
:mod:`steerscope.sites`) and a :class:`Call` describing the current forward call; it returns a
replacement tensor of the same shape, or ``None`` to leave the value unchanged.

Where each site lives is one declarative table, :data:`steerscope.sites.SITE_TABLE` (pyvene's idea of an adapter
as two small tables): site point -> module (by field of the family table), hook kind (``pre``,
``post`` or ``pattern``), shape adapter. The second table, the family (module paths per
``model_type``), is :mod:`steerscope.models.families`; the q/k/v head layout is
:mod:`steerscope.models.layout`.

Escape hatch for sites outside the vocabulary: a key of ``attached`` may also be a module path
of the HF model, e.g. ``"model.layers.3.mlp.act_fn"``; ``fn(x, call)`` then receives that module's
output (the first element when it returns a tuple) and may return a replacement.

Scope: hooks sit on shared modules, but a context's hooks act only for forward passes run in the
thread (or asyncio task) that entered it, so concurrent ``generate`` calls never see each other's
steering (a thread started inside the block is not covered; run it with
``contextvars.copy_context().run`` to include it). Every hook is removed in ``finally``; state
such as the attention implementation is reference counted per model, so contexts may exit in any
order (see :mod:`steerscope.models.attention`).

Also here, because they register hooks: :func:`block_inputs` (what each block is called with) and
:func:`widened_batch` (blocks from a layer on see the batch twice; the fast frozen generation).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch

from steerscope.errors import SiteError, UnsupportedModelError
from steerscope.models import attention as _attention
from steerscope.models.lm import LM
from steerscope.sites import SITE_TABLE, Site, SiteSpec

HookFn = Callable[[torch.Tensor, "Call"], "torch.Tensor | None"]
Put = Callable[[torch.Tensor], torch.Tensor]
_Fns = HookFn | list[HookFn]
Hooks = Mapping[str, _Fns] | Mapping[Site, _Fns] | Mapping[str | Site, _Fns]  # site or module path -> fn(s)
_ACTIVE: ContextVar[frozenset[int]] = ContextVar("steerscope_active_hooks", default=frozenset())
_IDS = itertools.count()


class _Handle(Protocol):
    def remove(self) -> None: ...


class Scope:
    """One :func:`attached` context; its hooks act only where :meth:`active` is true."""

    def __init__(self) -> None:
        self.id = next(_IDS)

    def active(self) -> bool:
        return self.id in _ACTIVE.get()

    def enter(self) -> None:
        _ACTIVE.set(_ACTIVE.get() | {self.id})

    def exit(self) -> None:
        _ACTIVE.set(_ACTIVE.get() - {self.id})


@dataclass
class Call:
    """Facts about the forward call in progress, shared by all hooks of one :func:`attached`.

    Attributes:
        mask: attention mask of the whole sequence so far [batch total_pos] (ones if none given).
        n_new: number of positions in this call (the ``pos`` length the hooks see).
        past: number of cached positions before this call (0 for a prefill).
        index: how many forward calls came before this one inside the context.
        prompt_mask: mask of the prompt [batch prompt_pos]; kept by cache-free calls that extend it (:meth:`begin`).
    """

    mask: torch.Tensor | None = None
    n_new: int = 0
    past: int = 0
    index: int = -1
    prompt_mask: torch.Tensor | None = None
    is_prefill: bool = True  # this call starts a sequence (its tokens are the prompt), with or without a cache
    store: dict[str, Any] = field(default_factory=dict)
    _prev: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # last cache-free ids, mask

    def begin(self, mask: torch.Tensor, n_new: int, past: int, ids: torch.Tensor | None = None) -> None:
        """Start the record of a new forward call (the top-level pre-hook calls this). A cache-free call whose
        ``ids`` [batch n_new] and mask extend the last one's (``generate(use_cache=False)``) keeps the prompt."""
        new = (ids, mask) if past == 0 and ids is not None and mask.shape == ids.shape else None
        self.is_prefill = past == 0 and not _extends(new, self._prev)
        self.mask, self.n_new, self.past, self._prev, self.index = mask, n_new, past, new, self.index + 1
        self.prompt_mask = mask if self.is_prefill else self.prompt_mask
        self.store.clear()

    def new_mask(self) -> torch.Tensor:
        """Mask of the positions in this call [batch pos]."""
        assert self.mask is not None
        return self.mask[:, -self.n_new :]


def _extends(new: tuple[torch.Tensor, torch.Tensor] | None, old: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Whether ``new`` (ids, mask) [batch pos] strictly extends ``old`` with the same rows."""
    n = old[0].shape[1] if old is not None else 0
    return (new is not None and old is not None and new[0].shape[0] == old[0].shape[0] and new[0].shape[1] > n
            and new[0].device == old[0].device and torch.equal(new[0][:, :n], old[0])
            and torch.equal(new[1][:, :n], old[1]))


# -- the site table ------------------------------------------------------------------------------
def _plain(_lm: LM, _site: Site, _call: Call, x: torch.Tensor) -> tuple[torch.Tensor, Put]:
    return x, lambda new: new


def _heads(lm: LM, _site: Site, _call: Call, x: torch.Tensor) -> tuple[torch.Tensor, Put]:
    b, p, _ = x.shape
    return x.view(b, p, lm.n_heads, lm.d_head), lambda new: new.reshape(b, p, -1)


def _qkv(which: str) -> Callable[[LM, Site, Call, torch.Tensor], tuple[torch.Tensor, Put]]:
    def adapt(lm: LM, _site: Site, _call: Call, x: torch.Tensor) -> tuple[torch.Tensor, Put]:
        lay = lm.layout
        return lay.split(x, which), lambda new: lay.merge(x, which, new)  # type: ignore[arg-type]
    return adapt


def _resid_mid(_lm: LM, site: Site, call: Call, x: torch.Tensor) -> tuple[torch.Tensor, Put]:
    pre = call.store[f"resid_pre.{site.layer}"]  # stored by the block pre-hook _install adds
    return pre + x, lambda new: new - pre


ADAPTERS: dict[str, Callable[[LM, Site, Call, torch.Tensor], tuple[torch.Tensor, Put]]] = {
    "plain": _plain, "heads": _heads, "q": _qkv("q"), "k": _qkv("k"), "v": _qkv("v"), "resid_mid": _resid_mid,
}


def _module_for(lm: LM, site: Site, spec: SiteSpec) -> torch.nn.Module:
    for key in spec.module:
        path = key if key == "" else getattr(lm.family, key)
        if path is None or (key != "" and path == ""):
            continue
        if site.layer is None:
            return lm.module(None, path)
        return lm.blocks[site.layer] if path == "" else lm.module(site.layer, path)
    raise SiteError(f"{site} does not exist in {lm.model.config.model_type}")


# -- hook kinds ----------------------------------------------------------------------------------
def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[no-any-return]


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _pre(mod: torch.nn.Module, scope: Scope, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> _Handle:
    """Pre-hook exposing the module's first input (positional or ``hidden_states``)."""
    def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not scope.active():
            return None
        new = edit(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
    return mod.register_forward_pre_hook(pre, with_kwargs=True)


def _post(mod: torch.nn.Module, scope: Scope, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> _Handle:
    """Post-hook exposing the module's output (first element of a tuple)."""
    def post(_m: Any, _a: Any, out: Any) -> Any:
        if not scope.active():
            return None
        new = edit(_first(out))
        return None if new is None else _replace_first(out, new)
    return mod.register_forward_hook(post)


def _install(lm: LM, site: Site, fn: HookFn, call: Call, scope: Scope) -> list[_Handle]:
    """Register the hook(s) that expose ``site`` to ``fn``, as :data:`SITE_TABLE` says."""
    spec = SITE_TABLE[site.point]
    mod = _module_for(lm, site, spec)
    adapt = ADAPTERS[spec.adapter]

    def edit(raw: torch.Tensor) -> torch.Tensor | None:
        x, put = adapt(lm, site, call, raw)
        new = fn(x, call)
        return None if new is None else put(new)

    handles: list[_Handle] = []
    if spec.adapter == "resid_mid":  # the block's input is needed to form resid_pre + attn_out
        assert site.layer is not None

        def grab(x: torch.Tensor) -> None:
            call.store[f"resid_pre.{site.layer}"] = x
        handles.append(_pre(lm.blocks[site.layer], scope, grab))
    if spec.hook == "pre":
        handles.append(_pre(mod, scope, edit))
    elif spec.hook == "post":
        handles.append(_post(mod, scope, edit))
    else:
        handles.append(_attention.add_pattern_hook(lm.model, mod, lambda probs: fn(probs, call), scope))
    return handles


def _target(lm: LM, key: str | Site) -> Site | str:
    """A key of :func:`attached`: a vocabulary site, else a module path of the HF model."""
    if isinstance(key, Site):
        return key.check(lm.n_layers)
    try:
        return Site.parse(key).check(lm.n_layers)
    except SiteError:
        if key.startswith("blocks.") or key in ("embed", "logits"):
            raise
        try:
            lm.model.get_submodule(key)
        except AttributeError:
            raise SiteError(
                f"{key!r} is neither a site ('blocks.<layer>.<point>', 'embed', 'logits') nor a module "
                f"of this {lm.model.config.model_type} model (e.g. 'model.layers.0.mlp'; see lm.model)"
            ) from None
        return key


def _top_pre(call: Call, scope: Scope) -> Callable[..., None]:
    def top_pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not scope.active():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        assert x is not None
        b, n = x.shape[0], x.shape[1]
        pkv = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(pkv.get_seq_length()) if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(b, past + n, dtype=torch.long, device=x.device)
        call.begin(mask, n, past, ids if ids is not None and ids.dim() == 2 else None)
    return top_pre


def compiled_part(model: torch.nn.Module) -> str | None:
    """The name of the first module of ``model`` that ``torch.compile`` wrapped ("" for the model itself), or None.

    Covers ``torch.compile(model)``, ``model.compile()``, a compiled ``forward`` assigned to a module and
    transformers' own compiled call (``generate`` with a static cache may compile one).

    Example:
        >>> compiled_part(lm.model) is None
        True
    """
    for name, mod in model.named_modules():  # instance dicts only: nn.Module's __getattr__ raises on a miss (slow)
        own = vars(mod)
        if ("_orig_mod" in own.get("_modules", {}) or own.get("_compiled_call_impl") is not None
                or own.get("_compiled_call") is not None
                or hasattr(own.get("forward"), "_torchdynamo_orig_callable")):
            return str(name)
    return None


def refuse_compiled(lm: LM) -> None:
    """Raise :class:`UnsupportedModelError` when part of the model is compiled: dynamo does not guard on module
    hooks, so hooks added after compilation never run and an intervention would silently do nothing."""
    part = compiled_part(lm.model)
    if part is not None:
        where = f"module {part!r} of the model" if part else "the model"
        raise UnsupportedModelError(f"{where} is compiled with torch.compile: hooks added after compilation never "
                                    "run, so steering, ablation or recording would silently do nothing; "
                                    "use the uncompiled model")


@contextmanager
def attached(lm: LM, hooks: Hooks) -> Iterator[Call]:
    """Attach ``{site: fn}`` hooks for the duration of the block; always removed on exit.

    Args:
        lm: the model.
        hooks: site (``"blocks.6.resid_pre"`` or :class:`Site`) or HF module path
            (``"model.layers.3.mlp.act_fn"``: fn gets that module's output) to a function or list
            of functions ``fn(x, call) -> x' | None``.

    Yields:
        The shared :class:`Call` record (mask and cache facts of the forward call in progress).

    Example:
        >>> with attached(lm, {"blocks.3.resid_pre": lambda x, c: x * 0}):
        ...     lm.model(**batch)
    """
    refuse_compiled(lm)
    items: list[tuple[str | Site, _Fns]] = list(hooks.items())
    targets = [(_target(lm, key), fns if isinstance(fns, list) else [fns]) for key, fns in items]
    call, scope = Call(), Scope()
    handles: list[_Handle] = []
    scope.enter()
    try:
        handles.append(lm.model.register_forward_pre_hook(_top_pre(call, scope), with_kwargs=True))
        for target, fns in targets:
            for fn in fns:
                if isinstance(target, Site):
                    handles += _install(lm, target, fn, call, scope)
                else:
                    handles.append(_post(lm.model.get_submodule(target), scope,
                                         lambda x, fn=fn: fn(x, call)))  # type: ignore[misc]
        yield call
    finally:
        scope.exit()
        for h in reversed(handles):
            h.remove()


@dataclass
class BlockCall:
    """What one block was called with: the residual stream entering it and the other arguments."""

    hidden: torch.Tensor  # [batch pos d_model]
    args: tuple[Any, ...]  # positional arguments after the hidden states (usually none)
    kwargs: dict[str, Any]  # attention mask, rotary embeddings, position ids, ... as the model passed them


@contextmanager
def block_inputs(lm: LM, layers: Sequence[int]) -> Iterator[dict[int, BlockCall]]:
    """Record, for each block in ``layers``, what the model calls it with (the last call wins).

    Lets a caller run blocks ``l..`` again on other residual streams exactly as the model would
    (see :mod:`steerscope.circuits._suffix`) without re-implementing masks or rotary embeddings. A cache is
    never kept: ``past_key_values``/``cache`` are recorded as None and ``use_cache`` as False.

    Example:
        >>> with block_inputs(lm, [6, 7]) as calls:
        ...     lm.model(**batch)
        >>> calls[6].kwargs["position_embeddings"]
    """
    refuse_compiled(lm)
    seen: dict[int, BlockCall] = {}
    scope = Scope()

    def rec(layer: int) -> Callable[..., None]:
        def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not scope.active():
                return
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            for k in ("past_key_values", "cache"):
                if k in kw:
                    kw[k] = None
            if "use_cache" in kw:
                kw["use_cache"] = False
            x = args[0] if args else kwargs["hidden_states"]
            seen[layer] = BlockCall(x, tuple(args[1:]), kw)
        return pre

    handles: list[_Handle] = []
    scope.enter()
    try:
        for layer in layers:
            handles.append(lm.blocks[layer].register_forward_pre_hook(rec(layer), with_kwargs=True))
        yield seen
    finally:
        scope.exit()
        for h in handles:
            h.remove()


def _twice(x: Any, rows: int) -> Any:
    """Concatenate every tensor with ``rows`` leading rows (and >= 2 dims) with itself; recurse into
    tuples, lists and dicts; leave everything else (caches, 1-D positions, broadcast masks) alone."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x]) if x.dim() >= 2 and x.shape[0] == rows else x
    if isinstance(x, (tuple, list)):
        return type(x)(_twice(v, rows) for v in x)
    if isinstance(x, dict):
        return {k: _twice(v, rows) for k, v in x.items()}
    return x


@contextmanager
def widened_batch(lm: LM, layer: int, head_on_copy: bool = False) -> Iterator[None]:
    """Blocks ``layer..`` see every batch row twice: rows [0, B) then a copy [B, 2B).

    Block ``layer``'s residual input and, for every block from ``layer`` on, each argument that
    carries the batch (attention mask, rotary embeddings, position ids) are concatenated with
    themselves, so the model's own forward computes blocks below ``layer`` once and the rest on
    2B rows (their KV cache holds 2B rows). The output then has 2B rows, or, with
    ``head_on_copy``, only the copy's B rows: the final norm and the LM head skip rows [0, B).
    Used by the fast frozen generation (:mod:`steerscope.analyses.frozen`); the pre-hooks run before any
    other hook on the blocks.

    Example:
        >>> with widened_batch(lm, 3):
        ...     lm.model(**batch).logits.shape[0] == 2 * batch["input_ids"].shape[0]
        True
    """
    refuse_compiled(lm)
    scope, rows = Scope(), [0]

    def hook(i: int) -> Callable[..., Any]:
        def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not scope.active():
                return None
            x = args[0] if args else kwargs["hidden_states"]
            if i == layer:  # the residual stream is doubled once; later blocks get it doubled
                rows[0], x = x.shape[0], torch.cat([x, x])
            kw = {k: (x if k == "hidden_states" else _twice(v, rows[0])) for k, v in kwargs.items()}
            return ((x, *_twice(args[1:], rows[0])) if args else args), kw
        return pre

    handles: list[_Handle] = []
    scope.enter()
    try:
        for i in range(layer, lm.n_layers):
            handles.append(lm.blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True, prepend=True))
        if head_on_copy:
            handles.append(_pre(lm.final_norm, scope, lambda x: x[rows[0]:]))
        yield
    finally:
        scope.exit()
        for h in handles:
            h.remove()


def hook_count(model: torch.nn.Module) -> int:
    """Total number of forward / pre-forward hooks registered on any submodule (for leak tests)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += _attention.pattern_hook_count(m)
    return n
