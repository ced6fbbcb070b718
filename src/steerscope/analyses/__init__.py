"""Analyses: one module per mechanism, each returning typed records."""
