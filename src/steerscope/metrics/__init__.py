"""Metrics: pure functions on text or logits (refusal matching, refusal log-odds, KL, ASR, judges)."""

from steerscope.metrics.refusal import (
    REFUSAL_SUBSTRINGS,
    asr,
    is_refusal,
    is_repetitive,
    kl_divergence,
    refusal_logodds,
    refusal_rate,
    refusal_token_ids,
    repetitive_rate,
)

__all__ = ["REFUSAL_SUBSTRINGS", "asr", "is_refusal", "kl_divergence", "refusal_logodds", "refusal_rate",
           "refusal_token_ids", "is_repetitive", "repetitive_rate"]
