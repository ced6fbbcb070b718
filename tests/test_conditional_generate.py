"""ss.generate(..., condition=...): chat-formatted, batched, left-padded; each row gated on its own prompt."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.backends.base import Addition, Request, groups, requests
from steerscope.conditional import Condition
from steerscope.errors import BackendError

PROMPTS = ["Hi", "Tell me a long story about a dragon and a knight", "2 + 2?", "What is the capital of France, please?",
           "Write a poem", "Explain gravity to a child in simple words"]


def _hand_gates(lm, cond):
    out = []
    for p in PROMPTS:
        enc = lm.tokenize([lm.format_chat(p)])
        with torch.no_grad():
            h = lm.model(**enc, output_hidden_states=True).hidden_states[cond.layer][0]
        out.append(float(cond.project(h[None])[0].mean()) > cond.threshold)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_a_condition_steers_exactly_the_rows_whose_gate_opens(family, smol_tokenizer):
    lm = make_tiny(family, seed=6, tokenizer=smol_tokenizer)
    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1))
    probe = Condition(d, 1, 0.0)
    scores = []
    for p in PROMPTS:
        enc = lm.tokenize([lm.format_chat(p)])
        with torch.no_grad():
            h = lm.model(**enc, output_hidden_states=True).hidden_states[1]
        scores.append(float(probe.project(h)[0].mean()))
    mid = torch.tensor(scores).sort().values[2:4]  # midway between the middle two: no prompt sits on the threshold
    cond = Condition(d, 1, float(mid.mean()))
    hand = _hand_gates(lm, cond)
    assert any(hand) and not all(hand)
    vec = ss.SteeringVector({2: 8 * torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))})
    kw = dict(max_new_tokens=6, batch_size=4)  # two batches, the first left-padded
    gated = ss.generate(lm, PROMPTS, vector=vec, alpha=3.0, condition=cond, **kw)
    plain = ss.generate(lm, PROMPTS, **kw)
    assert gated != plain
    for p, g, opened in zip(PROMPTS, gated, hand):
        alone = ss.generate(lm, [p], vector=vec, alpha=3.0, **kw) if opened else ss.generate(lm, [p], **kw)
        assert [g] == alone, (p, opened)


def test_requests_with_a_condition_group_apart_and_compiled_vllm_refuses_five_conditions(tiny_llama):
    vec = ss.SteeringVector({2: torch.ones(tiny_llama.d_model)})
    cond = Condition(torch.ones(tiny_llama.d_model), 1, 0.0)
    reqs = requests(["a", "b"], vec, 1.0, condition=cond) + requests(["c"], vec, 1.0) + [Request("d")]
    assert reqs[0].intervention.condition is cond  # type: ignore[union-attr]
    assert groups(reqs) == [[0, 1, 3], [2]]  # the unsteered row joins the first additions (alpha 0: a no-op)
    five = cond & cond & cond & cond & Condition(torch.ones(tiny_llama.d_model), 1, 0.0, on="token")  # graph: <= 4
    with pytest.raises(BackendError, match="5 conditions in one gate.*use the eager engine"):  # before any engine starts
        ss.generate(tiny_llama, ["a"], vector=vec, alpha=1.0, condition=five, backend="vllm", compiled=True)
    assert Addition(vec).condition is None
