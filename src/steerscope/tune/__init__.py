"""``tune``: which layer, which alpha, which positions, chosen on held-out data (issue 23).

Algorithm:
  1. Pair the contrast examples (i-th positive with i-th negative) and split the pairs, seeded, into
     train / validation / test (half, a quarter, a quarter; at least 2 in validation and test); the
     shipped neutral prompts are split in halves for the validation and test KL (:mod:`.data`).
  2. Extract on train with :func:`steerscope.extract` (the method name passes through) at every
     candidate layer.
  3. Search layer x alpha x positions on validation (:mod:`.search`: Optuna TPE with successive
     halving, or the exhaustive grid) against objective = behaviour effect - penalty for a worst-5 %
     neutral KL above the budget (:mod:`.objective`: by default the teacher-forced log-odds of the
     positive vs the negative continuation, a single forward per configuration).
  4. Measure the best configuration once on test: the effect with a 95 % bootstrap interval over test
     pairs and the worst-5 % KL over the neutral test prompts.
  5. Write the chosen layer of the vector with a ``use`` record (:class:`steerscope.vector.Use`: alpha,
     its range, positions, KL budget, the test figure, the data hash), ``tune.json`` and ``report.html``
     (the validation surface beside the test figure).

Example:
    >>> res = ss.tune(lm, formal, casual, out="runs/tune-formality")
    >>> with ss.steering(lm, res.vector):  # the recommended alpha (the file: res.vector_path)
    ...     ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Recommended", "SearchRecord", "Settings", "Split", "TestFigure", "Trial", "TuneResult",
           "default_layers", "tune"]


def __getattr__(name: str) -> Any:
    """The public names on first use (PEP 562): ``steerscope.tune.command``, the CLI's parser, needs no torch."""
    if name not in __all__:
        raise AttributeError(f"module 'steerscope.tune' has no attribute {name!r}")
    module = "steerscope.tune.tuner" if name in ("default_layers", "tune") else "steerscope.tune.records"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from steerscope.tune.records import Recommended, SearchRecord, Settings, Split, TestFigure, Trial, TuneResult
    from steerscope.tune.tuner import default_layers, tune
