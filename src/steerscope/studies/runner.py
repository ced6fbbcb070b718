"""Resumable study runs: one JSON record per finished step in a run folder.

A step is a function returning a JSON-serialisable dict. :meth:`Run.step` skips a step whose
record exists (unless ``force``); a record is written atomically (temp file + rename) only after
the step finishes, so a killed run loses no finished step. Large artefacts (vectors, adapters)
go in the run folder beside the records; a step writes them before returning.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from steerscope.errors import StudyError


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default))
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if is_dataclass(o):
        return asdict(o)  # type: ignore[arg-type]
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class Run:
    """A run folder with resumable steps.

    Example:
        >>> run = Run("runs/refusal", config={"seed": 0})
        >>> res = run.step("select", lambda: {"layer": 12})
    """

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None, force: bool = False) -> None:
        self.folder = Path(folder)
        self.steps_dir = self.folder / "steps"
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.folder / "config.json"
        if config is not None:
            if cfg_path.is_file() and not force:
                old = json.loads(cfg_path.read_text())
                if old != json.loads(json.dumps(config, default=_default)):
                    raise StudyError(
                        f"{self.folder} holds a run with another configuration; use a new --out folder or --force"
                    )
            write_json(cfg_path, config)
        self.force = force
        self.log: list[str] = []

    def done(self, name: str) -> bool:
        return (self.steps_dir / f"{name}.json").is_file()

    def load(self, name: str) -> dict[str, Any]:
        p = self.steps_dir / f"{name}.json"
        if not p.is_file():
            raise StudyError(f"step {name!r} has not run in {self.folder}")
        return json.loads(p.read_text())

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` unless its record exists; return the record (with ``_seconds``)."""
        if self.done(name) and not self.force:
            self.log.append(f"{name}: cached")
            return self.load(name)
        t0 = time.time()
        res = fn()
        res = dict(res)
        res["_seconds"] = round(time.time() - t0, 2)
        write_json(self.steps_dir / f"{name}.json", res)
        self.log.append(f"{name}: {res['_seconds']} s")
        return res

    def path(self, *parts: str) -> Path:
        p = self.folder.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """Save a (one-level nested) dict of tensors as safetensors, atomically; never pickled.

    ``{"edges": t, "batch": {"ids": t2}}`` is stored under keys ``edges`` and ``batch.ids``;
    lists of numbers become 1-D tensors.
    """
    import torch
    from safetensors.torch import save_file

    flat: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for sub, t in items:
            key = k if sub is None else f"{k}.{sub}"
            flat[key] = (t if isinstance(t, torch.Tensor) else torch.tensor(t)).detach().cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(flat, str(tmp))
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> dict[str, Any]:
    """Inverse of :func:`save_tensors`."""
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except Exception as e:
        raise StudyError(f"{path} is unreadable ({str(e)[:100]}); delete it and its step record, then rerun") from None
    out: dict[str, Any] = {}
    for key, t in flat.items():
        if "." in key:
            k, sub = key.split(".", 1)
            out.setdefault(k, {})[sub] = t
        else:
            out[key] = t
    return out
