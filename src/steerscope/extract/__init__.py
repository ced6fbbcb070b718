"""Steering-vector extraction: contrast methods (dim, caa, pca, probe, actadd)."""

from steerscope.extract.aggregate import METHODS
from steerscope.extract.contrast import collect, extract

__all__ = ["METHODS", "collect", "extract"]
