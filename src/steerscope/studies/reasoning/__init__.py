"""Reasoning study: steering vectors trained with RLOO on a verifiable task, and what they do."""
