"""Model loading, the :class:`LM` view, q/k/v layouts and architecture adapters."""

from steerscope.models.families import FAMILIES, Family, family_for
from steerscope.models.layout import QKVLayout
from steerscope.models.lm import LM
from steerscope.models.load import ALIASES, Alias, apply_adapter, from_hf, load_model

__all__ = ["ALIASES", "FAMILIES", "Alias", "Family", "LM", "QKVLayout", "apply_adapter", "family_for",
           "from_hf", "load_model"]
