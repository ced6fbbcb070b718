"""Reports: figures and HTML from result records. No model code here."""

from steerscope.report.html import Report

__all__ = ["Report"]
