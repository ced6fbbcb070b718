"""Progress bars (tqdm on stderr), off when not asked for or when not on a terminal in CI."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(it: Iterable[T], desc: str = "", enabled: bool = True, total: int | None = None) -> Iterable[T]:
    """Wrap ``it`` in a tqdm bar when enabled (and ``STEERSCOPE_NO_PROGRESS`` is unset)."""
    if not enabled or os.environ.get("STEERSCOPE_NO_PROGRESS"):
        return it
    from tqdm.auto import tqdm

    bar: Iterable[T] = tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return bar
