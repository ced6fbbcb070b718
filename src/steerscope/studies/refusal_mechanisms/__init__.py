"""The refusal-mechanisms study (docs/refusal-mechanisms.md): why refusal steering works.

The study protocol (see :mod:`steerscope.studies.protocol`): ``Config``, ``run(cfg, out, device, force)``
and ``write_report(out)``; ``run`` and ``write_report`` are imported on first use.
"""

from __future__ import annotations

from steerscope.studies.protocol import lazy_entry_points
from steerscope.studies.refusal_mechanisms.config import Config

__all__ = ["Config", "run", "write_report"]
__getattr__ = lazy_entry_points(__name__)
