"""Steering vectors: per-layer directions with provenance, stored as safetensors.

The torch-free half (provenance records, metadata checks, the file reader) is
:mod:`steerscope.data.vector_file`; its names are re-exported here.

A :class:`SteeringVector` maps layer -> direction [d_model] at one site (default ``resid_pre``).
Files are safetensors with a JSON ``steerscope`` metadata entry; nothing is ever unpickled.
llama.cpp control vectors (GGUF) can be exported and imported: :mod:`steerscope.control_vectors` registers
the ``.gguf`` format in :data:`FILE_FORMATS` (it imports this module; this module never imports it).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple

import torch

from steerscope.data import shipped_vectors as shipped_vectors  # re-exported: it lived here
from steerscope.data.vector_file import FORMAT_VERSION as FORMAT_VERSION  # the torch-free half, re-exported
from steerscope.data.vector_file import MAX_LAYERS as MAX_LAYERS
from steerscope.data.vector_file import OPERATIONS as OPERATIONS
from steerscope.data.vector_file import Provenance as Provenance
from steerscope.data.vector_file import Use as Use
from steerscope.data.vector_file import check_finite as check_finite
from steerscope.data.vector_file import layer_index, read_safetensors, resolve
from steerscope.data.vector_file import layer_indices as layer_indices
from steerscope.data.vector_file import provenance_from_dict as provenance_from_dict
from steerscope.errors import FingerprintWarning, SiteError, VectorError
from steerscope.sites import RESIDUAL_POINTS

if TYPE_CHECKING:
    from steerscope.models.lm import LM


class FileFormat(NamedTuple):
    """How to read and write one foreign vector file format, e.g. llama.cpp's ``.gguf``."""

    load: Callable[[Path, int | None], SteeringVector]  # (path, the target model's n_layers) -> vector
    save: Callable[[SteeringVector, str | Path, str | None], Path]  # (vector, path, model hint) -> path


#: Foreign file formats by suffix. :mod:`steerscope.control_vectors` adds ``.gguf`` when it is imported, and
#: ``steerscope/__init__.py`` imports it, so the entry is there before any of this module's code runs.
FILE_FORMATS: dict[str, FileFormat] = {}


def _file_format(suffix: str) -> FileFormat:
    if suffix not in FILE_FORMATS:  # the .gguf format registers itself on import (kept out of the import graph)
        importlib.import_module("steerscope.control_vectors")
    fmt = FILE_FORMATS.get(suffix)
    if fmt is None:
        raise VectorError(f"no reader or writer for {suffix} vector files; save as .safetensors or .gguf")
    return fmt


def dataset_hash(items: Iterable[Any]) -> str:
    """A short stable hash of a dataset (list of strings or pairs)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


class LayerDirection(NamedTuple):
    """The one layer of a one-layer vector and its direction [d_model]."""

    layer: int
    direction: torch.Tensor


class SteeringVector:
    """Per-layer directions at one site.

    Args:
        directions: ``{layer: tensor[d_model]}``.
        site: the site point the directions are added at (``resid_pre`` by default).
        provenance: optional :class:`Provenance`.

    Example:
        >>> v = SteeringVector({12: torch.randn(576)})
        >>> (2 * v - v)[12].shape
        torch.Size([576])
    """

    def __init__(self, directions: Mapping[int, torch.Tensor], site: str = "resid_pre",
                 provenance: Provenance | None = None) -> None:
        if not directions:
            raise VectorError("a steering vector needs at least one layer: SteeringVector({layer: tensor})")
        if site not in RESIDUAL_POINTS:
            raise SiteError(f"steering site must be one of {', '.join(RESIDUAL_POINTS)}, not {site!r}")
        dirs: dict[int, torch.Tensor] = {}
        dims = set()
        for key, t in directions.items():
            layer = layer_index(key)
            t = torch.as_tensor(t).detach()
            if t.dim() != 1:
                raise VectorError(f"layer {layer}: a direction must be 1-D [d_model], got shape {tuple(t.shape)}")
            t = t.float().cpu()
            if not torch.isfinite(t).all() or not torch.isfinite(t.norm()):
                raise VectorError(f"layer {layer}: the direction contains NaN or inf, or its norm overflows "
                                  "float32; re-extract it or drop the layer")
            dirs[layer] = t
            dims.add(t.shape[0])
        if len(dims) > 1:
            raise VectorError(f"all directions must have one size, got {sorted(dims)}")
        self.directions = dict(sorted(dirs.items()))
        self.site = site
        self.provenance = provenance or Provenance()

    # -- access ------------------------------------------------------------------------------
    def __getitem__(self, layer: int) -> torch.Tensor:
        try:
            return self.directions[layer]
        except KeyError:
            raise VectorError(f"this vector has no layer {layer}; it has layers {self.layers}") from None

    def __contains__(self, layer: int) -> bool:
        return layer in self.directions

    def __iter__(self) -> Any:
        return iter(self.directions)

    def __len__(self) -> int:
        return len(self.directions)

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    def __repr__(self) -> str:
        norms = ", ".join(f"{k}: {v.norm():.3g}" for k, v in self.directions.items())
        return f"SteeringVector(site={self.site!r}, norms={{{norms}}}, method={self.provenance.method!r})"

    # -- arithmetic --------------------------------------------------------------------------
    def _like(self, dirs: dict[int, torch.Tensor], method: str) -> SteeringVector:
        """A derived vector: its provenance without ``use`` (a recommended alpha is for this vector only)."""
        prov = replace(self.provenance, method=method, args=dict(self.provenance.args), use=None)
        return SteeringVector(dirs, self.site, prov)

    def _check_other(self, other: SteeringVector) -> None:
        if other.site != self.site:
            raise VectorError(f"cannot combine a {self.site} vector with a {other.site} vector")
        if other.d_model != self.d_model:
            raise VectorError(f"cannot combine vectors of size {self.d_model} and {other.d_model}")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        self._check_other(other)
        keys = sorted(set(self.directions) | set(other.directions))
        z = torch.zeros(self.d_model)
        return self._like({k: self.directions.get(k, z) + other.directions.get(k, z) for k in keys}, "sum")

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-1.0) * other

    def __mul__(self, c: float) -> SteeringVector:
        return self._like({k: v * float(c) for k, v in self.directions.items()},
                          self.provenance.method or "scaled")

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def norms(self) -> dict[int, float]:
        return {k: float(v.norm()) for k, v in self.directions.items()}

    def normalize(self) -> SteeringVector:
        """Unit-norm direction at every layer."""
        out = {}
        for k, v in self.directions.items():
            n = v.norm()
            if n == 0:
                raise VectorError(f"layer {k} is the zero vector and cannot be normalised")
            out[k] = v / n
        return self._like(out, self.provenance.method or "normalized")

    def select(self, layers: Iterable[int]) -> SteeringVector:
        """A vector with only ``layers``; its ``use`` record is kept when they include the layers it names."""
        layers = list(layers)
        use = self.provenance.use
        prov = self.provenance if use is None or set(use.layers) <= set(layers) else replace(self.provenance, use=None)
        return SteeringVector({k: self[k] for k in layers}, self.site, prov)

    def single_layer(self, site: str | None = "resid_pre", purpose: str = "this analysis") -> LayerDirection:
        """The layer and direction of a one-layer vector, for analyses that take exactly one.

        Args:
            site: the site the analysis needs (None: any).
            purpose: what needs it, for the error message (e.g. ``"attribution"``).

        Returns:
            :class:`LayerDirection` ``(layer, direction [d_model])``; unpacks as a pair.

        Raises:
            VectorError: the vector has several layers or another site (the message says how to fix it).

        Example:
            >>> layer, s = vec.select([12]).single_layer(purpose="attribution")
        """
        if len(self) != 1 or (site is not None and self.site != site):
            want = f"one-layer {site} vector" if site else "one-layer vector"
            raise VectorError(f"{purpose} takes a {want}, got site {self.site} with layers {self.layers}; "
                              f"use vector.select([layer])" + (f" on a {site} vector" if site else ""))
        layer = self.layers[0]
        return LayerDirection(layer, self.directions[layer])

    def cosine(self, other: SteeringVector) -> dict[int, float]:
        """Cosine similarity per shared layer."""
        self._check_other(other)
        shared = [k for k in self.directions if k in other.directions]
        if not shared:
            raise VectorError(f"no shared layers: {self.layers} vs {other.layers}")
        return {k: float(torch.nn.functional.cosine_similarity(self[k], other[k], dim=0)) for k in shared}

    # -- compatibility -----------------------------------------------------------------------
    def check_compatible(self, lm: LM, strict_fingerprint: bool = False) -> None:
        """Raise :class:`VectorError` if the vector cannot be applied to ``lm``; warn on another fingerprint."""
        if self.d_model != lm.d_model:
            raise VectorError(f"vector has size {self.d_model} but model {lm.name} has d_model {lm.d_model}: it was "
                              f"made for another model ({self.provenance.model or 'unknown'}); re-extract it on this model")
        bad = [k for k in self.layers if k >= lm.n_layers]
        if bad:
            hint = ""
            if self.provenance.method == "gguf-import" and bad == [lm.n_layers] and self.site == "resid_pre":
                hint = (f"; this llama.cpp vector has direction.{lm.n_layers - 1} (the output of the last block): "
                        f"load it with import_gguf(path, n_layers={lm.n_layers}) to steer there as resid_post")
            raise VectorError(f"vector layers {bad} are out of range: {lm.name} has layers 0..{lm.n_layers - 1}"
                              + hint)
        fp = self.provenance.fingerprint
        if fp and fp not in (lm.fingerprint, getattr(lm, "legacy_fingerprint", None)):
            msg = (f"vector was made on weights with fingerprint {fp} ({self.provenance.model}), "
                   f"not {lm.fingerprint} ({lm.name}); results may not transfer")
            if strict_fingerprint:
                raise VectorError(msg + "; pass strict_fingerprint=False to apply it anyway")
            warnings.warn(msg, FingerprintWarning, stacklevel=2)

    # -- I/O ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file with tensors ``layer.{l}`` and JSON metadata ``steerscope``."""
        from safetensors.torch import save

        from steerscope._files import atomic_write, dumps

        path = Path(path)
        meta = {"format_version": FORMAT_VERSION, "site": self.site, "provenance": asdict(self.provenance)}
        tensors = {f"layer.{k}": v.contiguous() for k, v in self.directions.items()}
        atomic_write(path, save(tensors, metadata={"steerscope": dumps(meta, None)}))
        return path

    @classmethod
    def load(cls, path_or_name: str | Path, n_layers: int | None = None) -> SteeringVector:
        """Load from a ``.safetensors`` file, a ``.gguf`` control vector, or a shipped name
        ``"<model-alias>/<name>"`` (e.g. ``"smollm2-135m-safe/refusal-dim"``); ``n_layers`` (the target
        model's) only matters for ``.gguf`` files: see :func:`steerscope.control_vectors.import_gguf`."""
        path = resolve(path_or_name)
        if path.suffix == ".gguf":
            return _file_format(".gguf").load(path, n_layers)
        site, prov, dirs = read_safetensors(path, "pt")
        return cls(dirs, site, prov)

    def export_gguf(self, path: str | Path, model_hint: str | None = None) -> Path:
        """Write a llama.cpp control vector (``--control-vector``), as repeng does; the provenance and
        ``use`` travel as ``steerscope.*`` keys.

        llama.cpp adds ``direction.{n}`` to the output of block ``n`` (our ``resid_post`` of
        block n, which is ``resid_pre`` of block n+1); resid_pre layers are shifted by one.
        See :func:`steerscope.control_vectors.export_gguf`.
        """
        return _file_format(".gguf").save(self, path, model_hint)
