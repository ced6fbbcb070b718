"""Recording activations at named sites."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from steerscope.errors import SiteError
from steerscope.hooks import Call, HookFn, attached
from steerscope.models.lm import LM
from steerscope.sites import Site


class ActivationCache(Mapping[str, torch.Tensor]):
    """Site -> recorded tensors, one per forward call, in each site's documented shape.

    A read-only :class:`collections.abc.Mapping` keyed by canonical site names (``"blocks.6.resid_pre"``;
    a :class:`Site` or any spelling :meth:`Site.parse` accepts works for lookups): ``len``, iteration,
    ``in``, ``keys``, ``values``, ``items`` and ``get``. ``cache[site]`` is the concatenation over calls
    along the ``pos`` axis (a generation's prefill and its decoded tokens); ``cache.calls(site)`` gives
    the per-call list (attention patterns have a different key length per call, so use ``calls`` for
    them: ``cache[site]``, ``values()`` and ``items()`` raise :class:`SiteError` for a pattern recorded
    over several calls). A site that was not recorded raises :class:`SiteError` (``get`` returns the default).
    Two caches are equal only if they are the same object (tensors have no single truth value).

    Example:
        >>> with recording(lm, ["blocks.6.resid_pre"]) as cache:
        ...     lm.model(**batch)
        >>> {site: x.shape for site, x in cache.items()}
    """

    def __init__(self) -> None:
        self._data: dict[str, list[torch.Tensor]] = {}

    def _add(self, site: str, x: torch.Tensor) -> None:
        self._data.setdefault(site, []).append(x)

    def calls(self, site: str | Site) -> list[torch.Tensor]:
        """The per-call tensors recorded at ``site``, in call order."""
        key = str(Site.parse(site))
        if key not in self._data:
            raise SiteError(f"{key} was not recorded (recorded: {', '.join(self._data) or 'nothing yet'})")
        return self._data[key]

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        parts = self.calls(site)
        if len(parts) == 1:
            return parts[0]
        if Site.parse(site).point == "attn.pattern":
            raise SiteError("attention patterns of several calls differ in key length; use cache.calls(site)")
        return torch.cat(parts, dim=1)

    def __contains__(self, site: object) -> bool:
        if not isinstance(site, (str, Site)):
            return False
        try:
            return str(Site.parse(site)) in self._data
        except SiteError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def get(self, site: str | Site, default: Any = None) -> Any:
        """``cache[site]`` if ``site`` was recorded, else ``default``."""
        return self[site] if site in self else default

    __eq__ = object.__eq__  # Mapping's item-wise == would compare tensors
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"ActivationCache({', '.join(f'{k}: {len(v)} call(s)' for k, v in self._data.items()) or 'empty'})"

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self._data.clear()


@contextmanager
def recording(lm: LM, sites: Iterable[str | Site], grad: bool = False, dtype: torch.dtype | None = None
              ) -> Iterator[ActivationCache]:
    """Record activations at ``sites`` for every forward call inside the block.

    Args:
        lm: the model.
        sites: e.g. ``["blocks.6.resid_pre", "blocks.3.attn.pattern"]``.
        grad: keep the autograd graph (no detach/clone), for attribution.
        dtype: store as this dtype (default: the model's).

    Example:
        >>> with recording(lm, ["blocks.6.resid_pre"]) as cache:
        ...     lm.model(**batch)
        >>> cache["blocks.6.resid_pre"].shape  # [batch pos d_model]
    """
    cache = ActivationCache()

    def make(key: str) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> None:
            y = x if grad else x.detach().clone()
            cache._add(key, y if dtype is None else y.to(dtype))
        return fn

    hooks: dict[Site, HookFn] = {}
    for s in sites:
        site = Site.parse(s)
        hooks[site] = make(str(site))
    with attached(lm, hooks):
        yield cache
