"""Steering-vector extraction: contrast methods (dim, caa, pca, probe, actadd, or any Aggregator)."""

from steerscope.extract.aggregate import METHODS, Aggregator
from steerscope.extract.contrast import collect, extract

__all__ = ["METHODS", "Aggregator", "collect", "extract"]
