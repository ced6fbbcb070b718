"""Resumable study runs: one JSON record per finished step in a run folder.

A step is a function returning a JSON-serialisable dict. :meth:`Run.step` skips a step whose
record exists (unless ``force``). The guarantees, in the order a run meets them:

1. **One writer.** ``Run`` takes an exclusive lock on ``<folder>/.lock`` (``flock``; the holder's pid
   is written into it). A second run on the same folder is refused with one line naming the holder;
   the lock of a dead process is released by the kernel, so a stale lock is simply taken over.
2. **Atomic, durable writes.** Every file goes to a unique temp file in the same folder, is fsynced
   and renamed over the target, so a reader sees the old file or the new one, never a torn one.
3. **Validated reads.** A record carries a checksum, the hash of the configuration it was computed
   under, and the sha256 of every artefact its step created through :meth:`Run.path`. A record that
   is unreadable, fails its checksum, belongs to another configuration, or whose artefacts are
   missing or changed is reported in one ``warning:`` line and recomputed. A corrupt ``config.json``
   is reported and rewritten (the per-record config hash keeps stale steps from being reused).
4. **Self-contained folders.** Paths into the run folder that a record holds are stored relative to
   the folder and resolved against the folder the run is opened from, so a moved or copied folder
   reads its own artefacts, from any working directory.

Non-finite floats are written as ``null`` (strict JSON). Large artefacts (vectors, adapters) go in
the run folder beside the records; a step writes them (at paths from :meth:`Run.path`) before returning.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from steerscope._files import (
    TEMP_NAME,
    acquire_folder_lock,
    atomic_write,
    check_free,
    dumps,
    inside,
    release_folder_lock,
)
from steerscope.errors import StudyError

if TYPE_CHECKING:
    from steerscope.analyses.records import Record
    from steerscope.vector import SteeringVector

R = TypeVar("R", bound="Record")
_META = ("_checksum", "_config", "_files", "_relpaths", "_nonfinite")


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON atomically (unique temp file, fsync, rename)."""
    atomic_write(Path(path), dumps(obj).encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path)).encode() if path.is_dir() else b"")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _checksum(rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]



def _nonfinite_paths(node: Any, keys: list[Any], out: list[list[Any]]) -> None:
    """Collect ``[*keys, "nan" | "inf" | "-inf"]`` for every non-finite float in ``node``, so that a
    record read back equals the one computed (the JSON itself stores them as null)."""
    if isinstance(node, float) and not math.isfinite(node):
        out.append([*keys, str(node)])
    elif isinstance(node, dict):
        for k, v in node.items():
            _nonfinite_paths(v, [*keys, str(k)], out)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _nonfinite_paths(v, [*keys, i], out)

def config_diff(old: Any, new: dict[str, Any]) -> str:
    """The settings that differ between a stored configuration and ``new``, e.g. ``seed: 0 -> 1``."""
    if not isinstance(old, dict):
        return "the stored config.json is not an object"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {dumps(old.get(k), None)} -> {dumps(new.get(k), None)}" for k in keys[:5]) + (
        f"; and {len(keys) - 5} more" if len(keys) > 5 else "")


def check_run_config(folder: str | Path, config: dict[str, Any], force: bool = False, partial: bool = False) -> bool:
    """Refuse, before any work, a run folder whose ``config.json`` holds another configuration (unless ``force``).

    ``partial``: ``config`` holds only the settings known so far (e.g. before the model loads, which
    fills in default layers); only those keys are compared.

    Returns:
        whether the folder's ``config.json`` is there but not JSON (:class:`Run` reports it and rewrites it).
        A file that cannot be read at all raises its ``OSError``, as opening the run would.
    """
    path = Path(folder) / "config.json"
    if force or not path.is_file():
        return False
    try:
        old = json.loads(path.read_text("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: too deep
        return True
    new = json.loads(dumps(config))
    if partial and isinstance(old, dict):
        old = {k: old.get(k) for k in new}
    if old != new:
        raise StudyError(f"{folder} holds a run with another configuration ({config_diff(old, new)}); "
                         "use a new --out folder or --force")
    return False


def warn(msg: str) -> None:
    """Report a recovered problem in one line on stderr."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class _Store:
    """What both run stores share: typed records over :meth:`step`, and tensor artefacts."""

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def record(self, name: str, cls: type[R], fn: Callable[[], R]) -> R:
        """Run ``fn`` (returning a record of type ``cls``) as step ``name``, or rebuild the stored one.

        Example:
            >>> rec = run.record("frozen", FrozenRecord, lambda: compute(...))
        """
        return cls.from_dict(self.step(name, lambda: fn().to_dict()))

    def load_record(self, name: str, cls: type[R]) -> R:
        """The stored record of step ``name`` as a ``cls`` (:class:`StudyError` when there is none)."""
        return cls.from_dict(self.load(name))

    def timing(self, name: str) -> dict[str, float | None]:
        """Wall and CPU seconds of a finished step, as first computed (not when reused)."""
        rec = self.load(name)
        return {"wall_s": rec.get("_seconds"), "cpu_s": rec.get("_cpu_seconds")}

    def save_tensors(self, name: str, tensors: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_tensors(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    folder: Path | None = None  # the run folder; None for a store kept in memory

    def vector_step(self, name: str, make: Callable[[], SteeringVector]) -> SteeringVector:
        """Run ``make`` as step ``name`` and keep its vector as the step's artefact (``<name>.safetensors`` in a
        folder run, with metadata; in memory otherwise); a finished step's vector is reloaded, not remade.

        Example:
            >>> v = run.vector_step("extract", lambda: ss.extract(lm, pos, neg, layers=[6]))
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release what the store holds (a folder run's lock); nothing for a store kept in memory."""


class MemoryRun(_Store):
    """The :class:`Run` interface without a folder: records and tensors kept in memory.

    Example:
        >>> run = MemoryRun(); run.step("a", lambda: {"x": 1})["x"]
        1
    """

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, dict[str, Any]] = {}
        self.vectors: dict[str, SteeringVector] = {}
        self.log: list[str] = []

    def vector_step(self, name: str, make: Callable[[], SteeringVector]) -> SteeringVector:
        def build() -> dict[str, Any]:
            self.vectors[name] = make()
            return {"vector": name}

        self.step(name, build)
        return self.vectors[name]

    def done(self, name: str) -> bool:
        return name in self.records

    def load(self, name: str) -> dict[str, Any]:
        if name not in self.records:
            raise StudyError(f"step {name!r} has not run")
        return self.records[name]

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name not in self.records:
            self.records[name] = _timed(fn)
        return self.records[name]

    def save_tensors(self, name: str, tensors: dict[str, Any]) -> None:
        self.tensors[name] = tensors

    def load_tensors(self, name: str) -> dict[str, Any]:
        if name not in self.tensors:
            raise StudyError(f"no tensors {name!r} in this run")
        return self.tensors[name]


TIMING = ("_seconds", "_cpu_seconds")  # what a store adds to each record it computes


def without_timing(rec: dict[str, Any]) -> dict[str, Any]:
    """A step's record without the store's timing keys (:data:`TIMING`): what the step returned."""
    return {k: v for k, v in rec.items() if k not in TIMING}


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()`` with its wall and process CPU seconds added (``_seconds``, ``_cpu_seconds``)."""
    t0, c0 = time.time(), time.process_time()
    res = dict(fn())
    res["_seconds"] = round(time.time() - t0, 2)
    res["_cpu_seconds"] = round(time.process_time() - c0, 2)
    return res


def _sweep_temp_files(folder: Path) -> None:
    """Remove the temp files and folders (``.<name>.<random>.tmp``, :func:`atomic_write` / :func:`atomic_folder`)
    that a killed run left in ``folder``; called with the folder's lock held, so no writer of this run owns them.
    Symlinks are unlinked, never followed."""
    stale = [p for p in folder.rglob(".*.tmp") if TEMP_NAME.fullmatch(p.name)]
    for p in stale:
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if stale:
        warnings.warn(f"removed {len(stale)} temporary file(s) an interrupted run left in {folder}", stacklevel=3)


class Run(_Store):
    """A locked run folder with resumable, validated steps.

    Args:
        folder: the run folder (created if missing).
        config: the run's configuration; a folder holding another one is refused unless ``force``.
        force: recompute every step.

    Example:
        >>> with Run("runs/refusal", config={"seed": 0}) as run:
        ...     res = run.step("select", lambda: {"layer": 12})
    """

    folder: Path

    def __init__(self, folder: str | Path, config: dict[str, Any] | None = None, force: bool = False) -> None:
        self._lock: str | None = None
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise StudyError(f"--out {self.folder} is a file, not a folder; give a folder path")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock = acquire_folder_lock(self.folder)
        except OSError as e:
            raise StudyError(f"cannot use run folder {self.folder} ({e.strerror or e}); choose a writable --out "
                             "folder") from None
        _sweep_temp_files(self.folder)
        self.steps_dir = self.folder / "steps"  # made by the first record written (no empty steps/ on an error)
        if self.steps_dir.is_symlink():
            self.close()
            raise StudyError(f"{self.steps_dir} is a symlink; steerscope writes records only inside the run "
                             "folder: remove the link or use a new --out folder")
        self.force = force
        self.log: list[str] = []
        self._stack: list[set[Path]] = []
        self._config_hash = hashlib.sha256(dumps(config, None).encode()).hexdigest()[:16] if config else None
        if config is not None:
            self._check_config(config)

    def _check_config(self, config: dict[str, Any]) -> None:
        cfg_path = self.folder / "config.json"
        if check_run_config(self.folder, config, self.force):
            warn(f"{cfg_path} is unreadable; rewriting it (steps of another configuration are recomputed)")
        write_json(cfg_path, json.loads(dumps(config)))

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the folder lock (also done when the object is collected or the process exits)."""
        if self._lock is not None:
            release_folder_lock(self._lock)
            self._lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # -- records --------------------------------------------------------------------------------
    def _record_path(self, name: str) -> Path:
        p = self.steps_dir / f"{name}.json"
        inside(self.folder, p.parent, "records folder")
        return p

    def _read(self, name: str) -> tuple[dict[str, Any] | None, str]:
        """(record, "") when valid, else (None, why)."""
        p = self._record_path(name)
        if not p.is_file():
            return None, "missing"
        try:
            rec = json.loads(p.read_text("utf-8"))
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser's stack
            return None, f"not valid JSON ({str(e)[:60]})"
        if not isinstance(rec, dict):
            return None, "not a JSON object"
        if "_checksum" not in rec or "_config" not in rec:
            return None, "missing its integrity fields (_checksum/_config)"
        if rec["_checksum"] != _checksum(rec):
            return None, "checksum mismatch (edited or damaged)"
        if self._config_hash and rec["_config"] != self._config_hash:
            return None, "computed under another configuration"
        files = rec.get("_files") or {}
        if not isinstance(files, dict):
            return None, "its _files field is not an object"
        for rel, digest in files.items():
            why = self._artefact_problem(rel)
            if why:
                return None, why
            if _sha256(self.folder / rel) != digest:
                return None, f"its artefact {rel} is damaged or changed"
        for keys in rec.get("_relpaths") or []:
            node: Any = rec
            try:
                for k in keys:
                    node = node[k]
            except (KeyError, IndexError, TypeError):
                continue
            if isinstance(node, str) and self._outside(node):
                return None, f"its path {node!r} leads outside the run folder"
        return self._resolve(rec), ""

    def _outside(self, rel: str) -> bool:
        """True when ``rel`` is absolute or resolves outside the run folder."""
        try:
            inside(self.folder, Path(rel))
        except StudyError:
            return True
        return Path(rel).is_absolute()

    def _artefact_problem(self, rel: Any) -> str:
        """Why the artefact ``rel`` of a record is unusable ("" when it is a file or folder inside the run)."""
        if not isinstance(rel, str) or self._outside(rel):
            return f"its artefact {rel!r} leads outside the run folder"
        f = self.folder / rel
        if not f.exists():
            return f"its artefact {rel} is missing"
        if not (f.is_file() or f.is_dir()):
            return f"its artefact {rel} is not a regular file"
        return ""

    def _resolve(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Strip bookkeeping and turn stored relative paths into paths under this folder."""
        rels = rec.get("_relpaths") or []
        out = {k: v for k, v in rec.items() if k not in _META}
        for keys in rels:
            node: Any = out
            try:
                for k in keys[:-1]:
                    node = node[k]
                node[keys[-1]] = str(self.folder / node[keys[-1]])
            except (KeyError, IndexError, TypeError):
                continue
        for *keys, value in rec.get("_nonfinite") or []:  # NaN/inf are stored as null (strict JSON)
            node = out
            try:
                for k in keys[:-1]:
                    node = node[k]
                if node[keys[-1]] is None:
                    node[keys[-1]] = float(value)
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        return out

    def done(self, name: str) -> bool:
        """Whether a valid record of step ``name`` exists."""
        return self._read(name)[0] is not None

    def load(self, name: str) -> dict[str, Any]:
        """The validated record of step ``name``; :class:`StudyError` when it is missing or invalid."""
        rec, why = self._read(name)
        if rec is None:
            raise StudyError(f"step {name!r} has no valid record in {self.folder} ({why}); rerun the study")
        return rec

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` unless a valid record exists; return the record (with ``_seconds``)."""
        if not self.force:
            rec, why = self._read(name)
            if rec is not None:
                self.log.append(f"{name}: cached")
                return rec
            if why != "missing":
                warn(f"record {self._record_path(name)} is {why}; recomputing step {name!r}")
        self._stack.append(set())
        try:
            res = _timed(fn)
        finally:
            made = self._stack.pop()
        write_json(self._record_path(name), self._stored(res, made))
        self.log.append(f"{name}: {res['_seconds']} s")
        return res

    def _stored(self, res: dict[str, Any], made: set[Path]) -> dict[str, Any]:
        """The on-disk form: relative paths, artefact hashes, config hash, checksum."""
        nonfinite: list[list[Any]] = []
        _nonfinite_paths(res, [], nonfinite)
        raw = json.loads(dumps(res))
        strings = {str(p): p for p in made} | {str(p.resolve()): p for p in made}
        rels: list[list[Any]] = []

        def walk(node: Any, keys: list[Any]) -> Any:
            if isinstance(node, dict):
                return {k: walk(v, keys + [k]) for k, v in node.items()}
            if isinstance(node, list):
                return [walk(v, keys + [i]) for i, v in enumerate(node)]
            if isinstance(node, str) and node in strings:
                rels.append(keys)
                return str(strings[node].relative_to(self.folder))
            return node

        rec: dict[str, Any] = walk(raw, [])
        files = {str(p.relative_to(self.folder)): _sha256(p) for p in sorted(made) if p.exists()}
        rec.update({"_files": files, "_relpaths": rels, "_nonfinite": nonfinite, "_config": self._config_hash})
        rec["_checksum"] = _checksum(rec)
        return rec

    def save_tensors(self, name: str, tensors: dict[str, Any]) -> None:
        """Store tensors as ``tensors/<name>.safetensors`` (an artefact of the step in progress)."""
        save_tensors(self.path("tensors", f"{name}.safetensors"), tensors)

    def load_tensors(self, name: str) -> dict[str, Any]:
        return load_tensors(self.folder / "tensors" / f"{name}.safetensors")

    def vector_step(self, name: str, make: Callable[[], SteeringVector]) -> SteeringVector:
        from steerscope.vector import SteeringVector as Vector  # torch: imported when a vector step runs

        rec = self.step(name, lambda: {"path": str(make().save(self.path(f"{name}.safetensors")))})
        return Vector.load(rec["path"])

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (parent folders created). Called inside a step, the file it
        names becomes an artefact of that step: hashed into the record and checked on resume."""
        p = self.folder.joinpath(*parts)
        inside(self.folder, p.parent, "folder")  # before mkdir: a '..' or a symlinked subfolder (vectors/) is refused
        p.parent.mkdir(parents=True, exist_ok=True)
        if self._stack:
            self._stack[-1].add(p)
        return p


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """Save a (one-level nested) dict of tensors as safetensors, atomically; never pickled.

    ``{"edges": t, "batch": {"ids": t2}}`` is stored under keys ``edges`` and ``batch.ids``;
    lists of numbers become 1-D tensors.
    """
    import torch
    from safetensors.torch import save

    flat: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for sub, t in items:
            key = k if sub is None else f"{k}.{sub}"
            flat[key] = (t if isinstance(t, torch.Tensor) else torch.tensor(t)).detach().cpu().contiguous()
    atomic_write(Path(path), save(flat))


def load_tensors(path: str | Path) -> dict[str, Any]:
    """Inverse of :func:`save_tensors`; :class:`StudyError` for a missing or unreadable file."""
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


__all__ = ["TIMING", "MemoryRun", "Run", "check_free", "without_timing", "load_tensors", "save_tensors", "warn", "write_json"]
