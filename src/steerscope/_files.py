"""Strict JSON, atomic and durable file writes (used by vectors and run folders), and the run-folder lock."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from steerscope.errors import StudyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not protected
    fcntl = None  # type: ignore[assignment]
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

__all__ = ["atomic_folder", "atomic_write", "dumps", "file_mode", "inside", "umask"]

_UMASK_LOCK = threading.Lock()


def _default(o: Any) -> Any:
    if is_dataclass(o):
        return asdict(o)  # type: ignore[arg-type]
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(o: Any) -> Any:
    """``o`` with NaN/inf floats replaced by None, numpy/tensor values as lists (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k) if not isinstance(k, str) else k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return _finite(_default(o))


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (non-finite floats become null; never ``NaN``/``Infinity``)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def umask() -> int:
    """The process's current umask, read without changing it where the platform allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting and restoring it
    under a lock (a restrictive 0o077 meanwhile, so a file another thread creates in that instant
    is never more open than intended).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def file_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` (0o666) or ``mkdir`` (0o777) would give under the current umask."""
    return (0o777 if directory else 0o666) & ~umask()


def inside(folder: Path, path: Path, what: str = "path") -> Path:
    """``path`` resolved, checked to lie inside ``folder`` (resolved); :class:`StudyError` otherwise.

    A symlinked subfolder (``steps/``, ``vectors/``) or a ``..``/absolute component that leads out of
    the folder is refused, so nothing a run writes or reads lands outside it.
    """
    root = Path(folder).resolve()
    target = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    if target != root and root not in target.parents:
        raise StudyError(f"{what} {path} leads outside the run folder {folder} (a symlink or '..'); "
                         "remove the link or use a new --out folder")
    return target


TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""The name of a temp file or folder of :func:`atomic_write` / :func:`atomic_folder` (mkstemp / mkdtemp with
prefix ``.<name>.`` and suffix ``.tmp``): what a killed writer can leave behind."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temp file in the same folder, fsync and rename.

    The file gets the mode any other tool would give it (0o666 less the umask), not
    :func:`tempfile.mkstemp`'s private 0o600. A symlink at ``path`` is replaced, never followed.
    A failed write (disk full, a signal) leaves the old file and no temp file behind, and the
    :class:`StudyError` it raises names ``path``.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise StudyError(f"cannot write {path} ({e.strerror or e}); free disk space or choose a writable "
                         "folder (the previous file, if any, is unchanged)") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_folder(folder: Path, write: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """Fill ``folder`` by ``write(tmp)`` into a unique temp folder beside it, then rename it into place.

    Concurrent writers never share a temp folder: the first rename wins, and a writer that finds a
    ``complete`` folder already in place discards its own copy. An incomplete folder in the way (from
    an older version or a crash) is replaced.

    Args:
        folder: the final folder. write: fills the folder it is given. complete: whether a folder is valid.

    Returns:
        ``folder``.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, file_mode(directory=True))  # mkdtemp's folder is private (0o700)
        write(tmp)
        for _ in range(3):
            try:
                os.rename(tmp, folder)  # atomic; fails when another writer's folder is already there
                break
            except OSError:
                if complete(folder):
                    break
                shutil.rmtree(folder, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(folder.parent)
    return folder


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# -- the folder lock ------------------------------------------------------------------------------
_HELD: dict[str, list[Any]] = {}  # resolved folder -> [fd, refcount]; one lock per process and folder
_HELD_LOCK = threading.Lock()


def acquire_folder_lock(folder: Path) -> str:
    """Take the exclusive lock of a run folder (shared within this process); :class:`StudyError` if another holds it."""
    key = str(folder.resolve())
    with _HELD_LOCK:
        if key in _HELD:
            _HELD[key][1] += 1
            return key
        if fcntl is None:  # pragma: no cover
            _HELD[key] = [None, 1]
            return key
        lock = folder / ".lock"
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise StudyError(f"{lock} is a symlink or not a regular file; remove it (steerscope never follows "
                             "or truncates it)")
        # never follow a link, never block on a FIFO; the type is checked again on the open descriptor
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StudyError(f"{lock} is not a regular file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except StudyError:
            os.close(fd)
            raise
        except OSError:
            err = _in_use(folder, fd)
            os.close(fd)
            raise err from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        _HELD[key] = [fd, 1]
        return key


def _in_use(folder: Path, fd: int) -> StudyError:
    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    who = f"process {holder[0]}" if holder else "another process"
    return StudyError(f"run folder {folder} is in use by {who}; wait for it to finish or use another --out folder")


def check_free(folder: str | Path) -> None:
    """Raise the :class:`StudyError` a :class:`Run` would if another process holds ``folder`` now, without
    creating or keeping anything (a command calls it before it loads a model; the Run still locks)."""
    lock = Path(folder) / ".lock"
    if fcntl is None or not lock.is_file():
        return
    with _HELD_LOCK:
        if str(Path(folder).resolve()) in _HELD:  # this process holds it: a Run here will share it
            return
        try:
            fd = os.open(lock, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return  # unreadable: the Run reports it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe: closing the descriptor releases it
        except OSError:
            raise _in_use(Path(folder), fd) from None
        finally:
            os.close(fd)


def release_folder_lock(key: str) -> None:
    """Release one hold of :func:`acquire_folder_lock` (the lock goes with the last)."""
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            if held[0] is not None:
                os.close(held[0])  # closing the descriptor releases the flock
