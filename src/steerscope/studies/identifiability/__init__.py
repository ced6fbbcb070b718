"""The identifiability study (docs/identifiability.md): are steering vectors identifiable?

The study protocol (see :mod:`steerscope.studies.protocol`): ``Config``, ``run(cfg, out, device, force)``
and ``write_report(out)``; ``run`` and ``write_report`` are imported on first use.
"""

from __future__ import annotations

from steerscope.studies.identifiability.config import Config
from steerscope.studies.protocol import lazy_entry_points

__all__ = ["Config", "run", "write_report"]
__getattr__ = lazy_entry_points(__name__)
