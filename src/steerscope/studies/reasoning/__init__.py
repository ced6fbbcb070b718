"""The reasoning study (docs/reasoning.md): RL-trained steering vectors on a verifiable task.

The study protocol (see :mod:`steerscope.studies.protocol`): ``Config``, ``run(cfg, out, device, force)``
and ``write_report(out)``; ``run`` and ``write_report`` are imported on first use.
"""

from __future__ import annotations

from typing import Any

from steerscope.studies.reasoning.config import Config

__all__ = ["Config", "run", "write_report"]


def __getattr__(name: str) -> Any:
    if name in ("run", "write_report"):
        from steerscope.studies.reasoning import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
