"""Frozen generation: the one-batch implementation against the two-pass reference; ablations by hand."""

from __future__ import annotations

import pytest
import torch
from test_refusal_mechanisms_fixtures import PROMPTS, tiny_lm, tiny_vector, one_thread  # noqa: F401

import steerscope as ss
from steerscope import freeze as F
from steerscope.errors import SteerscopeError
from steerscope.hooks import hook_count

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(one_thread):  # noqa: ANN001, ANN201
    return tiny_lm(layers=3)


def _pad_to(x: torch.Tensor, n: int, pad: int) -> torch.Tensor:
    return torch.cat([x, torch.full((x.shape[0], n - x.shape[1]), pad)], 1) if x.shape[1] < n else x[:, :n]


@pytest.mark.parametrize("mode", ["qk", "ov"])
def test_batched_frozen_generation_equals_the_two_pass_reference(lm, mode: str) -> None:
    v = tiny_vector(lm, layer=1, scale=2.0)
    before = hook_count(lm.model)
    fast = F.frozen_generate_ids(lm, PROMPTS[:3], v, 1.0, mode=mode, max_new_tokens=6)
    ref = F.reference_frozen_generate(lm, PROMPTS[:3], v, 1.0, mode=mode, max_new_tokens=6)
    pad = lm.tokenizer.pad_token_id
    assert torch.equal(_pad_to(fast, 6, pad), _pad_to(ref, 6, pad))
    assert hook_count(lm.model) == before
    assert lm.model.config._attn_implementation != "steerscope"


def test_frozen_modes_change_the_text_and_none_is_plain_steering(lm) -> None:
    v = tiny_vector(lm, layer=1, scale=2.0)
    plain = F.frozen_generate(lm, PROMPTS[:3], v, 1.0, mode="none", max_new_tokens=6)
    assert plain == ss.generate(lm, PROMPTS[:3], vector=v, alpha=1.0, max_new_tokens=6)
    base = ss.generate(lm, PROMPTS[:3], max_new_tokens=6)
    assert plain != base  # the vector matters in this fixture
    ov = F.frozen_generate(lm, PROMPTS[:3], v, 1.0, mode="ov", max_new_tokens=6)
    assert ov != plain


def test_svv_removal_feeds_the_value_projection_the_normed_input_without_s(lm) -> None:
    v = tiny_vector(lm, layer=1, scale=2.0)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    with torch.no_grad(), ss.recording(lm, ["blocks.1.resid_pre"]) as base:
        lm.model(**enc)
    got = {}
    with torch.no_grad(), ss.steering(lm, v, 1.0), ss.attached(lm, F.ablation_hooks(lm, v, 1.0, "svv")), \
            ss.attached(lm, {"blocks.1.attn.v": lambda x, _c: got.__setitem__("v", x.clone())}):
        lm.model(**enc)
    h = base["blocks.1.resid_pre"]
    x = h + v[1]
    norm = lm.module(1, lm.family.input_norm)
    rms = (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    want = lm.module(1, lm.family.v_proj)(lm.norm_weight(1, lm.family.input_norm) * h / rms)
    assert torch.allclose(got["v"].flatten(2), want, atol=1e-4)


def test_mlp_ablation_removes_the_normed_s_from_the_mlp_input(lm) -> None:
    v = tiny_vector(lm, layer=1, scale=2.0)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    got = {}
    rec = {"blocks.2.resid_mid": lambda x, _c: got.__setitem__("mid", x.clone()),
           "blocks.2.mlp_in": lambda x, _c: got.__setitem__("in", x.clone())}
    with torch.no_grad(), ss.steering(lm, v, 1.0), ss.attached(lm, F.ablation_hooks(lm, v, 1.0, "mlp")), \
            ss.attached(lm, rec):
        lm.model(**enc)
    norm = lm.module(2, lm.family.pre_mlp_norm)
    mid = got["mid"]
    rms = (mid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    assert torch.allclose(got["in"], lm.norm_weight(2, lm.family.pre_mlp_norm) * (mid - v[1]) / rms, atol=1e-4)


def test_bad_mode_is_a_user_error(lm) -> None:
    with pytest.raises(SteerscopeError):
        F.frozen_generate_ids(lm, PROMPTS[:1], tiny_vector(lm), 1.0, mode="qv")
