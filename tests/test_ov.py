"""Steering value vectors against the model's own value path (tiny random Llama, GQA)."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from steerscope.analyses import ov
from steerscope.analyses.lens import logit_lens
from steerscope.circuits import Node
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, tiny_lm  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_svv_equals_the_change_of_each_head_output_when_s_gamma_enters_the_value_path() -> None:
    lm = tiny_lm(layers=2)
    layer = 1
    s = torch.randn(lm.d_model)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    vproj = lm.module(layer, lm.family.v_proj)
    oproj = lm.module(layer, lm.family.o_proj)
    x = s * lm.norm_weight(layer, lm.family.input_norm)
    dv = (vproj(x) - vproj(torch.zeros_like(x))).view(lm.n_kv_heads, lm.d_head)  # the module itself, bias-free
    zs = {}

    def rec(key):
        return lambda z, _c: zs.__setitem__(key, z.clone())
    with torch.no_grad():
        with ss.attached(lm, {f"blocks.{layer}.attn.z": rec("base")}):
            lm.model(**enc)
        with ss.attached(lm, {f"blocks.{layer}.attn.v": lambda v, _c: v + dv,
                              f"blocks.{layer}.attn.z": rec("plus")}):
            lm.model(**enc)
    mask = enc["attention_mask"].bool()
    got = ov.svv(lm, layer, s)  # [head d]
    for h in range(lm.n_heads):
        z = torch.zeros_like(zs["plus"])
        z[:, :, h] = zs["plus"][:, :, h] - zs["base"][:, :, h]
        change = torch.nn.functional.linear(z.flatten(2), oproj.weight)  # head h's output change [b p d]
        assert torch.allclose(change[mask], got[h].expand(int(mask.sum()), -1), atol=1e-4), h


def test_logit_lens_reads_an_unembedding_row_back() -> None:
    lm = tiny_lm(layers=1)
    tid = lm.tokenizer.encode(" bread", add_special_tokens=False)[0]
    x = lm.W_U()[tid] / lm.norm_weight(None, lm.family.final_norm)
    top = logit_lens(lm, 50 * x, k=3, final_norm=True)[0].tokens
    bottom = logit_lens(lm, 50 * x, k=3, final_norm=True, largest=False)[0].tokens
    assert top[0] == " bread" and " bread" not in bottom


def test_lens_table_ranks_heads_by_absolute_score() -> None:
    lm = tiny_lm(layers=2)
    scores = {Node.attn_head(1, 0): 0.1, Node.attn_head(0, 3): -2.0, Node.mlp(1): 9.0, Node.steer(0): 5.0}
    rows = ov.lens_table(lm, torch.randn(lm.d_model), scores, n_heads=2, k=4)
    assert [r.node for r in rows] == [Node.attn_head(0, 3), Node.attn_head(1, 0)] and len(rows[0].top.tokens) == 4
