"""llama.cpp control vectors (GGUF): export and import, with llama.cpp's layer convention.

llama.cpp adds ``direction.N`` to the output of block N: our ``resid_post`` N, which is ``resid_pre``
N+1. llama.cpp rejects ``direction.0`` (and then drops the whole file), so layers that map there are
refused at export. Checked against llama.cpp itself by ``benchmarks/check_llamacpp.py``.

Beside llama.cpp's own keys (``controlvector.model_hint``, ``controlvector.layer_count``), export writes
namespaced keys that llama.cpp's control-vector loader never reads: ``steerscope.site``,
``steerscope.provenance`` (the provenance as JSON, without ``use``) and one ``steerscope.use.<field>``
per set field of the :class:`~steerscope.vector.Use` record (strings, int64 / float64 numbers or arrays,
so nothing is rounded). Import reads them back: safetensors -> GGUF -> safetensors loses nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from steerscope.data.vector_file import check_gguf_header
from steerscope.errors import VectorError
from steerscope.vector import (
    FILE_FORMATS,
    FileFormat,
    Provenance,
    SteeringVector,
    layer_indices,
    provenance_from_dict,
)

PREFIX = "steerscope.use."


def export_gguf(vec: SteeringVector, path: str | Path, model_hint: str | None = None) -> Path:
    """Write ``vec`` as a llama.cpp control vector (``--control-vector``), as repeng does.

    Args:
        vec: a ``resid_pre`` or ``resid_post`` vector (resid_pre layers are shifted by one).
        path: the ``.gguf`` file to write.
        model_hint: ``controlvector.model_hint`` (default: the vector's provenance model).

    Returns:
        ``path``.

    Example:
        >>> export_gguf(vec.select([12]), "cv.gguf")
    """
    shift = {"resid_pre": -1, "resid_post": 0}.get(vec.site)
    if shift is None:
        raise VectorError(f"only resid_pre / resid_post vectors map onto llama.cpp control vectors, not {vec.site}")
    if shift == -1 and 0 in vec.directions:
        raise VectorError("a resid_pre vector at layer 0 has no llama.cpp equivalent; select other layers")
    if vec.layers[0] + shift == 0:
        raise VectorError(
            f"{vec.site} layer {vec.layers[0]} maps to llama.cpp's direction.0, which llama.cpp rejects "
            "(it then drops the whole file and generates unsteered); select other layers, e.g. "
            f"vec.select({[k for k in vec.layers if k + shift > 0]})")
    tensors = {f"direction.{k + shift}": v.numpy() for k, v in vec.directions.items()}
    return write_control_vector(path, tensors, model_hint or vec.provenance.model or "unknown", extra=_extra(vec))


def _extra(vec: SteeringVector) -> dict[str, Any]:
    """The ``steerscope.*`` keys of ``vec`` (see the module docstring)."""
    prov = asdict(replace(vec.provenance, use=None))
    del prov["use"]
    out: dict[str, Any] = {"steerscope.site": vec.site, "steerscope.provenance": json.dumps(prov, default=str)}
    if vec.provenance.use is not None:
        out |= {PREFIX + k: v for k, v in vec.provenance.use.to_dict().items() if v is not None and v != []}
    return out


def _put(w: Any, key: str, value: Any) -> None:
    """One GGUF key: a string, an int64 / float64 number, or an array of them."""
    from gguf import GGUFValueType as T

    items = value if isinstance(value, list) else [value]
    kind = (T.STRING if all(isinstance(x, str) for x in items) else
            T.INT64 if all(isinstance(x, int) for x in items) else T.FLOAT64)
    if kind == T.FLOAT64:
        items = [float(x) for x in items]
    if isinstance(value, list):
        w.add_key_value(key, items, T.ARRAY, sub_type=kind)
    else:
        w.add_key_value(key, items[0], kind)


def write_control_vector(path: str | Path, tensors: Mapping[str, Any], model_hint: str | None = None,
                         extra: Mapping[str, Any] | None = None) -> Path:
    """Write named float32 tensors as a llama.cpp control-vector GGUF, without checking them
    (``export_gguf`` checks; tests use this to write malformed files).

    Example:
        >>> write_control_vector("cv.gguf", {"direction.11": np.zeros(576)}, "smollm2")
    """
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "controlvector")
    if model_hint is not None:
        w.add_string("controlvector.model_hint", model_hint)
        w.add_uint32("controlvector.layer_count", len(tensors))
    for key, value in (extra or {}).items():
        _put(w, key, value)
    for name, arr in tensors.items():
        w.add_tensor(name, arr.astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def import_gguf(path: str | Path, n_layers: int | None = None) -> SteeringVector:
    """Read a llama.cpp control vector.

    llama.cpp adds ``direction.N`` to the output of block N: our ``resid_post`` N, i.e. ``resid_pre``
    N+1. The vector is returned at ``resid_pre`` N+1, except when ``n_layers`` (the target model's
    block count) is given and the file has ``direction.{n_layers-1}`` (the last block's output, which
    llama.cpp's cvector-generator writes): then every layer is returned at ``resid_post`` N. A file
    written by :func:`export_gguf` comes back at its own site with its provenance and ``use`` record.

    Example:
        >>> import_gguf("cv.gguf", n_layers=lm.n_layers).site
        'resid_pre'
    """
    import gguf
    import numpy as np

    check_gguf_header(path)  # the tensor count, before the reader parses every tensor's description
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise VectorError(f"{path} is not a readable GGUF file ({str(e)[:120]})") from None
    hint_field = r.fields.get("controlvector.model_hint")
    hint = None
    if hint_field is not None and hint_field.data:
        hint = bytes(hint_field.parts[hint_field.data[0]]).decode("utf-8", "replace")
    found = {t.name: t for t in r.tensors if t.name.startswith("direction.")}
    if len(found) != sum(t.name.startswith("direction.") for t in r.tensors):
        raise VectorError(f"{path} holds a direction.N tensor twice; not a valid control vector")
    dirs = {}
    for idx_n, t in layer_indices(found, "direction", path).items():
        kind = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        if kind not in ("F32", "F16", "BF16"):
            raise VectorError(f"{path}: {t.name} is stored as {kind}; only F32, F16 and BF16 control-vector "
                              "directions are read (re-export it unquantized)")
        data = np.asarray(t.data)
        if data.ndim != 1 and sum(d > 1 for d in data.shape) > 1:
            raise VectorError(f"{path}: {t.name} has shape {tuple(data.shape)}; a control vector direction is 1-D")
        dirs[idx_n] = torch.tensor(data.astype("float32").reshape(-1))
    if not dirs:
        raise VectorError(f"{path} has no direction.N tensors; it is not a control vector")
    prov, site = _ours(r, path) or (Provenance(model=hint, method="gguf-import"), None)
    if site == "resid_post" or (site is None and n_layers is not None and max(dirs) == n_layers - 1):
        return SteeringVector(dirs, "resid_post", prov)
    return SteeringVector({n + 1: d for n, d in dirs.items()}, "resid_pre", prov)


def _ours(r: Any, path: str | Path) -> tuple[Provenance, str] | None:
    """(provenance with its ``use`` record, site) from the ``steerscope.*`` keys; None for other files."""
    fields = {k: f.contents() for k, f in r.fields.items() if k.startswith("steerscope.")}
    if "steerscope.site" not in fields:
        return None
    try:
        prov = json.loads(fields.get("steerscope.provenance", "{}"))
        use = {k[len(PREFIX):]: v for k, v in fields.items() if k.startswith(PREFIX)}
        if not isinstance(prov, dict):
            raise ValueError("steerscope.provenance is not a JSON object")
    except ValueError as e:
        raise VectorError(f"{path}: malformed steerscope keys ({e}); re-export the vector") from None
    site = fields["steerscope.site"]
    if site not in ("resid_pre", "resid_post"):
        raise VectorError(f"{path}: steerscope.site {site!r} is not resid_pre or resid_post; re-export the vector")
    return provenance_from_dict({**prov, "use": use or None}, str(path)), site


FILE_FORMATS[".gguf"] = FileFormat(load=import_gguf, save=export_gguf)  # SteeringVector.load / .export_gguf
