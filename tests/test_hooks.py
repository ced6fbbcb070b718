"""hooks.attached: the site table, the module-path escape, restoring state in any order."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

import steerscope as ss
from conftest import batch_ids, make_tiny
from steerscope.errors import SiteError
from steerscope.hooks import hook_count
from steerscope.sites import BLOCK_POINTS, GLOBAL_POINTS, SITE_TABLE


@pytest.fixture(scope="module")
def lm():
    return make_tiny("llama", seed=3)


def test_the_site_table_covers_the_whole_vocabulary():
    assert set(SITE_TABLE) == set(BLOCK_POINTS) | set(GLOBAL_POINTS)


def test_a_module_path_exposes_that_modules_output(lm):
    batch = batch_ids()
    got = {}
    path = "model.layers.1.mlp.act_fn"
    with ss.recording(lm, ["blocks.1.mlp_in"]) as c, torch.no_grad(), \
            ss.attached(lm, {path: lambda x, _c: got.__setitem__("act", x.clone())}):
        lm.model(**batch)
    mlp = lm.mlp(1)
    with torch.no_grad():
        want = mlp.act_fn(mlp.gate_proj(c["blocks.1.mlp_in"]))  # [batch pos d_mlp]
    torch.testing.assert_close(got["act"], want, rtol=0, atol=0)


def test_a_module_path_hook_can_replace_the_output(lm):
    batch = batch_ids()
    before = hook_count(lm.model)
    with torch.no_grad():
        ref = lm.model(**batch).logits
    with torch.no_grad(), ss.recording(lm, ["blocks.1.mlp_out"]) as c, \
            ss.attached(lm, {"model.layers.1.mlp.act_fn": lambda x, _c: torch.zeros_like(x)}):
        out = lm.model(**batch).logits
    assert torch.count_nonzero(c["blocks.1.mlp_out"]) == 0  # down_proj(0) = 0 (no bias)
    assert (out - ref).abs().max() > 1e-4
    assert hook_count(lm.model) == before
    with torch.no_grad():
        assert torch.equal(lm.model(**batch).logits, ref)


def test_an_unknown_key_is_a_site_error_naming_both_forms(lm):
    for bad in ("model.layers.1.nope", "blocks.1.resid_nope", "layers"):
        with pytest.raises(SiteError, match="site|point"):
            with ss.attached(lm, {bad: lambda x, _c: None}):
                pass
    assert hook_count(lm.model) == 0


def _state(lm):
    return (lm.model.config._attn_implementation, hook_count(lm.model),
            [(m.__dict__.get("_steerscope_pattern") is None) for m in lm.model.modules()])


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_two_pattern_recordings_exited_in_either_order_restore_everything(lm, order):
    batch = batch_ids(left_pad=2)
    before = _state(lm)
    with torch.no_grad():
        ref = lm.model(**batch).logits
    a = ss.recording(lm, ["blocks.1.attn.pattern", "blocks.2.attn.pattern"])
    b = ss.recording(lm, ["blocks.1.attn.pattern"])
    ca, cb = a.__enter__(), b.__enter__()
    assert lm.model.config._attn_implementation == "steerscope"
    with torch.no_grad():
        lm.model(**batch)
    torch.testing.assert_close(ca["blocks.1.attn.pattern"], cb["blocks.1.attn.pattern"], rtol=0, atol=0)
    first, second = (a, b) if order == "AB" else (b, a)
    first.__exit__(None, None, None)
    assert lm.model.config._attn_implementation == "steerscope"  # the other one still records
    with torch.no_grad():
        lm.model(**batch)
    second.__exit__(None, None, None)
    assert _state(lm) == before
    with torch.no_grad():
        assert torch.equal(lm.model(**batch).logits, ref)


def test_steering_and_patterns_interleaved_in_an_exit_stack_restore_everything(lm):
    batch = batch_ids()
    before = _state(lm)
    vec = ss.SteeringVector({1: torch.randn(lm.d_model)})
    with torch.no_grad():
        ref = lm.model(**batch).logits
    st = ExitStack()
    st.enter_context(ss.recording(lm, ["blocks.0.attn.pattern"]))
    inner = ss.steering(lm, vec, 2.0)
    inner.__enter__()
    st.enter_context(ss.patching(lm, {}))
    inner.__exit__(None, None, None)  # out of stack order
    st.close()
    assert _state(lm) == before
    with torch.no_grad():
        assert torch.equal(lm.model(**batch).logits, ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_site_has_the_shape_its_table_row_documents(family):
    tiny = make_tiny(family, seed=1)
    batch = batch_ids(n=2, length=5)
    dims = {"batch": 2, "pos": 5, "query": 5, "key": 5, "d_model": tiny.d_model, "head": tiny.n_heads,
            "kv_head": tiny.layout.n_kv_heads, "d_head": tiny.d_head, "vocab": tiny.model.config.vocab_size}
    sites = [p if p in GLOBAL_POINTS else f"blocks.1.{p}" for p in SITE_TABLE]
    with ss.recording(tiny, sites) as c, torch.no_grad():
        tiny.model(**batch)
    for point, spec in SITE_TABLE.items():
        got = c[point if point in GLOBAL_POINTS else f"blocks.1.{point}"]
        assert tuple(got.shape) == tuple(dims[a] for a in spec.shape.split()), point


def test_an_activation_cache_is_a_full_mapping(lm):
    from collections.abc import Mapping

    sites = ["blocks.1.resid_pre", "blocks.2.mlp_out"]
    with ss.recording(lm, sites) as c, torch.no_grad():
        lm.model(**batch_ids())
    assert isinstance(c, Mapping) and len(c) == 2 and list(c) == sites and list(c.keys()) == sites
    assert [k for k, _ in c.items()] == sites and all(torch.equal(v, c[k]) for k, v in c.items())
    assert all(torch.equal(v, c[k]) for k, v in zip(sites, c.values()))
    assert dict(c).keys() == set(sites)
    assert "blocks.1.resid_pre" in c and ss.Site(1, "resid_pre") in c and "blocks.3.resid_pre" not in c
    assert "not a site" not in c and 7 not in c
    assert torch.equal(c.get("blocks.2.mlp_out"), c["blocks.2.mlp_out"]) and c.get("blocks.0.mlp_out") is None
    assert c.get("blocks.0.mlp_out", 5) == 5 and c == c and c != ss.ActivationCache()
    assert "blocks.1.resid_pre" in repr(c) and "\n" not in repr(c)
    with pytest.raises(SiteError, match="not recorded"):
        c["blocks.3.resid_pre"]


def test_under_generate_last_positions_line_up_with_the_logits(lm):
    """HF's generate computes logits at each call's last position only: cache.last(site)[:, j] is the stream
    whose final norm and unembedding give cache["logits"][:, j] (checked by recomputing the logits)."""
    batch = batch_ids(n=2, length=4)
    L = lm.n_layers - 1
    with ss.recording(lm, [f"blocks.{L}.resid_post", "logits"]) as c, torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    n_new = out.shape[1] - batch["input_ids"].shape[1]
    assert c["logits"].shape[1] == n_new == c.last(f"blocks.{L}.resid_post").shape[1]
    assert c[f"blocks.{L}.resid_post"].shape[1] == batch["input_ids"].shape[1] + n_new - 1  # every position
    with torch.no_grad():
        again = lm.model.lm_head(lm.model.model.norm(c.last(f"blocks.{L}.resid_post")))
    assert torch.allclose(again, c["logits"], atol=1e-5)
    assert torch.equal(c["logits"].argmax(-1), out[:, batch["input_ids"].shape[1]:])  # greedy picks


@pytest.mark.parametrize("how", ["forward", "module", "submodule"])
def test_a_compiled_model_is_refused_instead_of_silently_ignoring_the_hooks(how):
    """Dynamo does not guard on module hooks: after ``torch.compile`` a hook added later never runs, so a
    steered forward gave the unsteered logits (seen on a tiny llama). Every hook context now refuses."""
    from steerscope.errors import UnsupportedModelError
    from steerscope.hooks import block_inputs, compiled_part

    lm = make_tiny("llama", seed=3)
    vec = ss.SteeringVector({1: torch.ones(lm.d_model)})
    assert compiled_part(lm.model) is None
    with ss.steering(lm, vec, 1.0):  # uncompiled: fine
        pass
    if how == "forward":
        lm.model.forward = torch.compile(lm.model.forward)  # lazy: nothing is compiled until a call
        expected = ""
    elif how == "module":
        lm.model.compile()
        expected = ""
    else:
        lm.blocks[1].compile()
        expected = compiled_part(lm.model)
        assert expected and expected.endswith("layers.1")
    assert compiled_part(lm.model) == expected
    with pytest.raises(UnsupportedModelError, match="torch.compile"):
        with ss.steering(lm, vec, 1.0):
            pass
    with pytest.raises(UnsupportedModelError, match="silently"):
        with block_inputs(lm, [1]):
            pass
    assert hook_count(lm.model) == 0  # nothing was left attached
