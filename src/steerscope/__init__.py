"""steerscope: activation steering for transformer language models, and why it works.

The public names below are imported on first use (PEP 562), so ``import steerscope`` and the
command line's ``--help`` do not pay for torch and transformers until a model is needed.

Example:
    >>> import steerscope as ss
    >>> lm = ss.load_model("smollm2-135m")
    >>> vec = ss.extract(lm, positive, negative, method="dim", layers=[12], positions=[-1])
    >>> with ss.steering(lm, vec, alpha=-1.0):
    ...     out = lm.model.generate(**lm.tokenize([lm.format_chat("Hi")]), max_new_tokens=16)
    >>> res = ss.tune(lm, positive, negative, out="runs/tune")  # layer, alpha, positions on held-out data
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from steerscope.errors import SteerscopeError

__version__ = "0.1.0"

#: public name -> the module that defines it (imported lazily by :func:`__getattr__`)
_LAZY: dict[str, str] = {
    "LM": "steerscope.models",
    "from_hf": "steerscope.models",
    "load_model": "steerscope.models",
    "ActivationCache": "steerscope.steer",
    "recording": "steerscope.steer",
    "Provenance": "steerscope.vector",
    "SteeringVector": "steerscope.vector",
    "Use": "steerscope.vector",
    "Site": "steerscope.sites",
    "Explanation": "steerscope.explain",
    "explain": "steerscope.explain",
    "collect": "steerscope.extract",
    "extract": "steerscope.extract",
    "generate": "steerscope.generation",
    "attached": "steerscope.hooks",
    "ablation": "steerscope.steer",
    "clamping": "steerscope.steer",
    "Condition": "steerscope.conditional",
    "FitReport": "steerscope.conditional.fit",
    "Rule": "steerscope.conditional.rules",
    "conditional_steering": "steerscope.conditional.rules",
    "orthogonalize": "steerscope.steer",
    "patching": "steerscope.steer",
    "steering": "steerscope.steer",
    "TuneResult": "steerscope.tune",
    "tune": "steerscope.tune",
    "select_direction": "steerscope.analyses.selection",
}

__all__ = [
    "ActivationCache",
    "Condition",
    "Explanation",
    "FitReport",
    "LM",
    "Provenance",
    "Rule",
    "Site",
    "SteeringVector",
    "SteerscopeError",
    "TuneResult",
    "Use",
    "ablation",
    "attached",
    "clamping",
    "collect",
    "conditional_steering",
    "explain",
    "extract",
    "from_hf",
    "generate",
    "load_model",
    "orthogonalize",
    "patching",
    "recording",
    "select_direction",
    "steering",
    "tune",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use; every vector file format (``.gguf``) is registered with it."""
    if name not in _LAZY:
        raise AttributeError(f"module 'steerscope' has no attribute {name!r}")
    importlib.import_module("steerscope.control_vectors")  # registers .gguf with SteeringVector
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


#: public functions named like the subpackage that defines them: the name stays the function
_SHADOWED = frozenset({"explain", "extract", "tune"})


class _Package(types.ModuleType):
    """The package module: importing ``steerscope.extract`` (the subpackage) must not replace
    ``steerscope.extract`` (the function), as the import system's ``setattr`` would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the subpackage stays in sys.modules; the public name resolves to the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # the names for type checkers and IDEs
    from steerscope.analyses.selection import select_direction
    from steerscope.conditional import Condition
    from steerscope.conditional.fit import FitReport
    from steerscope.conditional.rules import Rule, conditional_steering
    from steerscope.explain import Explanation, explain
    from steerscope.extract import collect, extract
    from steerscope.generation import generate
    from steerscope.hooks import attached
    from steerscope.models import LM, from_hf, load_model
    from steerscope.sites import Site
    from steerscope.steer import ActivationCache, ablation, clamping, orthogonalize, patching, recording, steering
    from steerscope.tune import TuneResult, tune
    from steerscope.vector import Provenance, SteeringVector, Use
