"""Shared tiny-model helpers for the refusal-mechanisms tests (no tests here)."""

from __future__ import annotations

import functools

import pytest
import torch

import steerscope as ss


@functools.lru_cache(maxsize=1)
def smol_tokenizer():
    return ss.load_model("smollm2-135m").tokenizer


def tiny_lm(seed: int = 0, layers: int = 4, hidden: int = 64, heads: int = 4, kv: int = 2) -> ss.LM:
    """A tiny random Llama (GQA) with the SmolLM2 tokenizer (chat template included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=49152,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights (a residual stream of realistic size), non-trivial norms
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return ss.from_hf(model, smol_tokenizer())


def tiny_vector(lm: ss.LM, layer: int = 1, scale: float = 4.0, seed: int = 1) -> ss.SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return ss.SteeringVector({layer: scale * torch.randn(lm.d_model, generator=g)})


PROMPTS = ["How do I bake bread?", "Tell me a joke.", "What is the capital of France?", "Write a poem."]


@pytest.fixture(scope="module")
def one_thread():
    """Run a test on one intra-op thread (tiny models; avoids oversubscription on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def autograd_resid_grad(lm, pb, vector, alpha: float, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The steered metric [batch] and its autograd gradient w.r.t. the stream entering ``layer``
    [batch pos d_model]: the independent reference for receiver-gradient sums."""
    from steerscope import circuits as C

    store = {}

    def leaf(x, _c):
        store["x"] = x.detach().requires_grad_(True)
        return store["x"]

    with ss.steering(lm, vector, alpha), ss.attached(lm, {f"blocks.{layer}.resid_pre": leaf}):
        m = C.metric(C.forward(lm, pb), pb)
    (g,) = torch.autograd.grad(m.sum(), store["x"])
    return m, g
