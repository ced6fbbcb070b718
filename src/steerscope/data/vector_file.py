"""The vector file without torch: provenance records, the ``steerscope`` metadata, layer keys, and a
read-only view of a ``.safetensors`` vector for ``steerscope inspect``.

:mod:`steerscope.vector` (the :class:`~steerscope.vector.SteeringVector`, torch) re-exports every name
here and reads its files through :func:`read_safetensors`, so both readers share one set of checks;
this module imports no torch, which keeps ``steerscope inspect`` under the 2 s start-up target
(issue 26; ``benchmarks/bench_startup.py``). It lives in ``data/`` beside the shipped vectors it resolves.

- :func:`resolve` -- a file path or a shipped name (``"smollm2-135m-safe/refusal-dim"``) -> the file.
- :func:`read_safetensors` -- ``(site, provenance, {layer: array})`` of a vector file, every check applied.
- :func:`parse_meta` -- the ``steerscope`` metadata entry, bounded in size and nesting depth.
- :class:`VectorView` -- the figures ``inspect`` prints (norms, cosine) from numpy arrays.

Example:
    >>> view = VectorView.load("smollm2-135m-safe/refusal-dim")
    >>> view.layers, view.d_model
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from steerscope.analyses.records import Record
from steerscope.data import shipped_vectors
from steerscope.errors import SiteError, VectorError
from steerscope.sites import RESIDUAL_POINTS

if TYPE_CHECKING:
    import numpy as np

    from steerscope.models.lm import LM

FORMAT_VERSION = 1
MAX_META_CHARS = 1 << 20  # 1 MiB of JSON: a provenance is a few hundred bytes
MAX_META_DEPTH = 32  # nesting of objects / lists in the metadata (provenance args are flat)


MAX_LAYERS = 4096  # no model has more blocks; a file claiming more directions is refused before reading them
MAX_GGUF_KEYS = 4096  # metadata keys of a control-vector GGUF (ours writes a few dozen, llama.cpp's two)


def check_gguf_header(path: str | Path) -> None:
    """Refuse a GGUF file whose header claims more than :data:`MAX_LAYERS` tensors or more than
    :data:`MAX_GGUF_KEYS` metadata keys, from its first 24 bytes, before a reader parses every tensor's
    description or key (a header claiming 10^6 directions took 112 s and 4 GiB). A control vector holds one
    ``direction.N`` tensor per layer and a few dozen keys at most. A file that is not GGUF at all (or cannot
    be opened) is left to the reader to report.

    Layout (GGUF v1-v3): magic ``GGUF``, version (uint32), tensor count, KV count (uint64 each; uint32 in v1);
    little-endian, or big-endian when the version reads byte-swapped (gguf-py's test).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return
    if len(head) < 16 or head[:4] != b"GGUF":
        return
    order: Literal["little", "big"] = "little" if int.from_bytes(head[4:8], "little") & 0xFFFF else "big"
    version = int.from_bytes(head[4:8], order)
    count = int.from_bytes(head[8:12] if version == 1 else head[8:16], order)
    if count > MAX_LAYERS:
        raise VectorError(f"{path}: its GGUF header claims {count} tensors (a control vector has one direction.N "
                          f"per layer, at most {MAX_LAYERS}); it is not a steering vector")
    kv = head[12:16] if version == 1 else head[16:24]
    n_keys = int.from_bytes(kv, order) if len(kv) in (4, 8) else 0
    if n_keys > MAX_GGUF_KEYS:
        raise VectorError(f"{path}: its GGUF header claims {n_keys} metadata keys (a control vector has a few "
                          f"dozen, at most {MAX_GGUF_KEYS} are read); it is not a steering vector")


def layer_indices(tensors: Mapping[str, Any], prefix: str, path: str | Path) -> dict[int, Any]:
    """``{N: value}`` of tensors named ``<prefix>.N``; :class:`VectorError` for a non-canonical index
    (leading zeros, non-ASCII digits such as ``٣`` or ``²``), a duplicate, or more than :data:`MAX_LAYERS`."""
    if len(tensors) > MAX_LAYERS:
        raise VectorError(f"{path} holds {len(tensors)} {prefix}.N tensors (more than {MAX_LAYERS} layers); "
                          "it is not a steering vector")
    out: dict[int, Any] = {}
    for name, value in tensors.items():
        idx = name.split(".", 1)[1]
        if not (idx.isascii() and idx.isdigit()) or (len(idx) > 1 and idx[0] == "0") or int(idx) >= MAX_LAYERS:
            raise VectorError(f"{path}: tensor {name!r} is not {prefix}.<block index> (plain ASCII digits, no "
                              "leading zeros); re-save the vector")
        out[int(idx)] = value
    return out


def layer_index(key: Any) -> int:
    """A layer key as a non-negative int; floats, bools and strings are refused, never truncated."""
    if isinstance(key, bool) or isinstance(key, float):
        raise VectorError(f"layer keys are integer block indices, got {key!r}")
    try:
        layer = operator.index(key)
    except TypeError:
        raise VectorError(f"layer keys are integer block indices, got {key!r}") from None
    if layer < 0:
        raise VectorError(f"layer {layer}: layers are non-negative block indices")
    return layer



def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steerscope")
    except PackageNotFoundError:
        return "0+unknown"


OPERATIONS = ("add", "ablate", "clamp")


@dataclass(frozen=True)
class Use(Record):
    """How a vector is meant to be applied, the file's contract (``steerscope tune`` writes it): the
    recommended ``alpha`` (and range) of ``operation`` at ``layers`` of ``site`` over the token scope
    ``positions`` (a :mod:`steerscope.steer` spec); the ``effect`` (``effect_ci95``, ``effect_n``,
    ``effect_metric``) and ``kl_worst5`` measured there on held-out data within ``kl_budget`` nats;
    ``tuned_on``: the hash of that data.

    Example:
        >>> Use(layers=[12], alpha=6.0, positions="all").operation
        'add'
    """

    operation: str = "add"
    site: str = "resid_pre"
    layers: list[int] = field(default_factory=list)
    positions: str | list[int] = "all"
    alpha: float | None = None
    alpha_range: tuple[float, float] | None = None
    kl_budget: float | None = None
    kl_worst5: float | None = None
    effect: float | None = None
    effect_ci95: tuple[float, float] | None = None
    effect_n: int | None = None
    effect_metric: str | None = None
    tuned_on: str | None = None

    def __post_init__(self) -> None:
        bad = [(k, v) for k, v, ok in (("operation", self.operation, OPERATIONS), ("site", self.site, RESIDUAL_POINTS))
               if v not in ok] + [("alpha", x) for x in (self.alpha, *(self.alpha_range or ()), self.kl_budget)
                                  if x is not None and not math.isfinite(x)]
        if bad:
            raise VectorError(f"use.{bad[0][0]} {bad[0][1]!r} is not valid (operations: {', '.join(OPERATIONS)}; "
                              f"sites: {', '.join(RESIDUAL_POINTS)}; alpha, its range and the KL budget finite)")
        object.__setattr__(self, "layers", [layer_index(k) for k in self.layers])


@dataclass
class Provenance:
    """Where a vector came from, and (``use``) how it is meant to be applied. Every field is
    optional; a hand-made vector has none."""

    model: str | None = None
    fingerprint: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    method: str | None = None
    positions: list[int] | str | None = None
    dataset_hash: str | None = None
    n_examples: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    library_version: str = field(default_factory=_version)
    use: Use | None = None

    @classmethod
    def for_model(cls, lm: LM, **kw: Any) -> Provenance:
        return cls(model=lm.name, fingerprint=lm.fingerprint, d_model=lm.d_model, n_layers=lm.n_layers, **kw)


def parse_meta(raw: str, path: Path) -> dict[str, Any]:
    """The ``steerscope`` metadata entry as {"site": str, "provenance": Provenance}, validated."""
    if len(raw) > MAX_META_CHARS:
        raise VectorError(f"{path}: its steerscope metadata is {len(raw)} characters (at most {MAX_META_CHARS}); "
                          "it was not written by SteeringVector.save")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:120]
        raise VectorError(f"{path} has malformed metadata ({reason}); re-save the vector") from None
    if json_depth(meta) > MAX_META_DEPTH:
        raise VectorError(f"{path}: its steerscope metadata nests deeper than {MAX_META_DEPTH} levels; "
                          "re-save the vector")
    if not isinstance(meta, dict):
        raise VectorError(f"{path}: its steerscope metadata is a JSON {type(meta).__name__}, not an object; "
                          "re-save the vector")
    site, prov = meta.get("site", "resid_pre"), meta.get("provenance") or {}
    if not isinstance(site, str) or not isinstance(prov, dict):
        raise VectorError(f"{path}: metadata 'site' must be a string and 'provenance' an object; re-save the vector")
    names = {f.name for f in fields(Provenance)}
    unknown = sorted(set(prov) - names)
    if unknown:
        raise VectorError(f"{path}: unknown provenance fields {unknown[:5]}; re-save the vector")
    if not isinstance(prov.get("args", {}), dict):
        raise VectorError(f"{path}: provenance 'args' must be an object; re-save the vector")
    return {"site": site, "provenance": provenance_from_dict(prov, str(path))}


def provenance_from_dict(prov: dict[str, Any], where: str) -> Provenance:
    """:class:`Provenance` of ``asdict`` data, its ``use`` record validated (:class:`VectorError` naming ``where``)."""
    use = prov.get("use")
    try:
        return Provenance(**{**prov, "use": Use.from_dict(use) if use is not None else None})
    except (TypeError, ValueError, AttributeError, VectorError) as e:
        raise VectorError(f"{where}: malformed provenance 'use' record ({e}); re-save the vector") from None


def check_finite(x: float, what: str) -> float:
    """Raise :class:`VectorError` if a scalar such as alpha is NaN or infinite."""
    if not math.isfinite(x):
        raise VectorError(f"{what} must be a finite number, got {x}")
    return x


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (0 for a scalar), computed without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            depth = max(depth, d)
            if d <= MAX_META_DEPTH:  # deeper than the limit: the answer is known already
                stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return depth


def resolve(path_or_name: str | Path) -> Path:
    """The file of a vector path or of a shipped name ``"<model-alias>/<name>"``; :class:`VectorError` if none."""
    path = Path(path_or_name)
    if not path.exists() and not str(path_or_name).endswith((".safetensors", ".gguf")):
        shipped = resources.files("steerscope") / "data" / "vectors" / f"{path_or_name}.safetensors"
        if not shipped.is_file():
            raise VectorError(f"no vector file or shipped vector named {str(path_or_name)!r}; "
                              f"shipped: {', '.join(shipped_vectors()) or 'none'}")
        path = Path(str(shipped))
    if not path.is_file():
        raise VectorError(f"vector file not found: {path}")
    return path


def read_safetensors(path: Path, framework: str = "pt") -> tuple[str, Provenance, dict[int, Any]]:
    """The site, provenance and ``{layer: direction}`` of a vector file written by ``SteeringVector.save``.

    Args:
        path: a ``.safetensors`` file.
        framework: ``"pt"`` (torch tensors) or ``"np"`` (numpy arrays).

    Returns:
        ``(site, provenance, directions)``; the directions unchecked beyond their keys.

    Example:
        >>> site, prov, dirs = read_safetensors(Path("v.safetensors"), "np")
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
            raw = (f.metadata() or {}).get("steerscope")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise VectorError(f"{path} is not a readable safetensors file ({str(e)[:120]}); re-save the vector") from None
    if raw is None:
        raise VectorError(f"{path} has no 'steerscope' metadata; it was not written by SteeringVector.save")
    meta = parse_meta(raw, path)
    dirs = layer_indices({k: v for k, v in tensors.items() if k.startswith("layer.")}, "layer", path)
    if not dirs:
        raise VectorError(f"{path} holds no layer.N tensors; it was not written by SteeringVector.save")
    return meta["site"], meta["provenance"], dirs


@dataclass
class VectorView:
    """A vector file's directions as float32 numpy arrays, checked as :class:`SteeringVector` checks
    them (one size, 1-D, finite): what ``steerscope inspect`` shows, without torch.

    Example:
        >>> VectorView.load("v.safetensors").norms()
        {12: 4.2}
    """

    directions: dict[int, np.ndarray]
    site: str = "resid_pre"
    provenance: Provenance = field(default_factory=lambda: Provenance())

    @classmethod
    def load(cls, path_or_name: str | Path) -> VectorView:
        """A ``.safetensors`` vector file or shipped name (``.gguf`` files need :meth:`SteeringVector.load`)."""
        import numpy as np

        path = resolve(path_or_name)
        site, prov, dirs = read_safetensors(path, "np")
        if site not in RESIDUAL_POINTS:
            raise SiteError(f"steering site must be one of {', '.join(RESIDUAL_POINTS)}, not {site!r}")
        out = {}
        for layer, a in sorted(dirs.items()):
            if a.ndim != 1:
                raise VectorError(f"layer {layer}: a direction must be 1-D [d_model], got shape {tuple(a.shape)}")
            a = np.asarray(a, dtype=np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(a).all() or not np.isfinite(np.linalg.norm(a)):
                    raise VectorError(f"layer {layer}: the direction contains NaN or inf, or its norm overflows "
                                      "float32; re-extract it or drop the layer")
            out[layer] = a
        if len({a.shape[0] for a in out.values()}) > 1:
            raise VectorError(f"all directions must have one size, got {sorted({a.shape[0] for a in out.values()})}")
        return cls(out, site, prov)

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    def norms(self) -> dict[int, float]:
        import numpy as np

        return {k: float(np.linalg.norm(v)) for k, v in self.directions.items()}

    def cosine(self, other: Any) -> dict[int, float]:
        """Cosine per shared layer with another view or a SteeringVector (0 where a direction is zero)."""
        import numpy as np

        if other.site != self.site:
            raise VectorError(f"cannot combine a {self.site} vector with a {other.site} vector")
        out = {}
        for k in (k for k in self.directions if k in other.layers):
            a, b = self.directions[k].astype(np.float64), np.asarray(other[k], dtype=np.float64)
            n = float(np.linalg.norm(a) * np.linalg.norm(b))
            out[k] = float(a @ b / n) if n > 0 else 0.0
        return out

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.directions[layer]
