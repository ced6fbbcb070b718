"""steerscope: activation steering for transformer language models, and why it works.

Example:
    >>> import steerscope as ss
    >>> lm = ss.load_model("smollm2-135m")
    >>> vec = ss.extract(lm, positive, negative, method="dim", layers=[12], positions=[-1])
    >>> with ss.steering(lm, vec, alpha=-1.0):
    ...     out = lm.model.generate(**lm.tokenize([lm.format_chat("Hi")]), max_new_tokens=16)
    >>> res = ss.tune(lm, positive, negative, out="runs/tune")  # layer, alpha, positions on held-out data
"""

from steerscope import control_vectors  # noqa: F401  (registers the .gguf format with SteeringVector)
from steerscope.errors import SteerscopeError
from steerscope.explain import Explanation, explain
from steerscope.extract import collect, extract
from steerscope.generation import generate
from steerscope.hooks import attached
from steerscope.models import LM, from_hf, load_model
from steerscope.record import ActivationCache, recording
from steerscope.sites import Site
from steerscope.steer import ablation, clamping, orthogonalize, patching, steering
from steerscope.tune import TuneResult, tune
from steerscope.vector import Provenance, SteeringVector, Use

__version__ = "0.1.0"

__all__ = [
    "LM",
    "ActivationCache",
    "Provenance",
    "Site",
    "SteeringVector",
    "TuneResult",
    "Use",
    "Explanation",
    "SteerscopeError",
    "ablation",
    "attached",
    "clamping",
    "collect",
    "explain",
    "extract",
    "from_hf",
    "generate",
    "load_model",
    "orthogonalize",
    "patching",
    "recording",
    "steering",
    "tune",
]
