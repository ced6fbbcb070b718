"""Model loading and architecture adapters."""

from steerscope.models.families import FAMILIES, Family, family_for
from steerscope.models.load import LM, from_hf, load_model

__all__ = ["FAMILIES", "Family", "LM", "family_for", "from_hf", "load_model"]
