"""Conditions and projection clamps per request on the vLLM backend: greedy fp32, token for token equal to the HF path.

One eager engine per model (SmolLM2-135M and the tiny random Qwen2 of test_vllm_parity), 8 prompts x 32 new tokens.
The gates are probes on each request's own residual; their thresholds are put midway between the 4th and 5th
prompt score (computed on HF), so in every batch some rows open and some stay shut. The HF reference is
``ss.steering(..., condition=)`` / ``ss.conditional_steering`` / ``ss.clamping`` on left-padded HF batches
(independent code: HF hooks on the HF model vs. the worker's gate on vLLM's own flattened batch).
Skipped without the engine environment (``steerscope vllm-setup``); the compiled refusal and the engine-side gate math are in
test_vllm_gates.py (no engine needed).
"""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from steerscope.backends import vllm as bv
from steerscope.conditional.clamp import Clamp
from test_vllm_parity import PROMPTS, check, hf_ids, rand_vec, tiny_qwen2
from test_vllm_parity import run as parity_run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bv.engine_python(required=False) is None,
                                                   reason="no vLLM engine environment (steerscope vllm-setup)")]


def prompt_means(lm, texts, layer) -> torch.Tensor:
    """Each prompt's mean resid_pre at ``layer`` [prompts d_model] (one HF forward per prompt)."""
    out = []
    for t in texts:
        with torch.no_grad():
            out.append(lm.model(**lm.tokenize([t]), output_hidden_states=True).hidden_states[layer][0].float().mean(0))
    return torch.stack(out)


def prompt_scores(lm, text, layer, unit, reduce) -> torch.Tensor:
    """One prompt's projection on ``unit`` at ``layer``, reduced over its tokens (last / max)."""
    with torch.no_grad():
        h = lm.model(**lm.tokenize([text]), output_hidden_states=True).hidden_states[layer][0].float()
    p = h @ unit
    return p[-1] if reduce == "last" else p.max()


def split_condition(lm, texts, layer, seed, on="prompt", reduce="mean") -> tuple[ss.Condition, list[bool]]:
    """A condition that opens on half the prompts (a seeded half): its direction is the difference of the two
    halves' mean residuals, its threshold midway between the 4th and 5th prompt score (a clear gap); the score is
    the mean projection, or for a prompt condition the projection reduced as the condition reduces it."""
    m = prompt_means(lm, texts, layer)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    half = len(texts) // 2
    d = m[perm[:half]].mean(0) - m[perm[half:]].mean(0)
    s = m @ (d / d.norm())  # the mean projection of each prompt
    if on == "prompt" and reduce != "mean":
        s = torch.stack([prompt_scores(lm, t, layer, d / d.norm(), reduce) for t in texts])
    lo, hi = s.sort().values[half - 1: half + 1].tolist()
    assert hi - lo > 1e-3 * float(s.abs().max()), f"scores too close to split: {s.tolist()}"
    c = ss.Condition(d, layer=layer, threshold=(lo + hi) / 2, reduce=reduce, on=on)
    return c, (s > c.threshold).tolist()


@pytest.fixture(scope="module", params=["smollm2", "qwen2-tiny"])
def setup(request, smol):
    if request.param == "smollm2":
        lm, gate_layer, layer, norm = smol, 6, 12, 10.0
    else:
        lm, gate_layer, layer, norm = tiny_qwen2(smol.tokenizer), 1, 2, 4.0
    engine = bv.engine_for(lm)
    texts = [lm.format_chat(p) for p in PROMPTS]
    cond, opened = split_condition(lm, texts, gate_layer, seed=5)
    yield dict(lm=lm, engine=engine, texts=texts, ids=bv.prompt_ids(lm, texts, True), name=request.param,
               vec=rand_vec(lm, [layer], norm, 0), other=rand_vec(lm, [layer], norm, 7), cond=cond, opened=opened,
               gate_layer=gate_layer, layer=layer, plain=None, base=None)
    engine.close()


def run(s, specs):
    """The parity tests' engine call, and no request reported as split across a gate decision."""
    out = parity_run(s, specs)
    assert not s["engine"].stats()["bad"], s["engine"].stats()["bad"]
    return out


def reference(s):
    """HF unsteered and plainly steered ids (computed once per model)."""
    if s["base"] is None:
        s["base"] = hf_ids(s["lm"], s["texts"])
        s["plain"] = hf_ids(s["lm"], s["texts"], ss.steering(s["lm"], s["vec"], alpha=1.0))
        assert s["plain"] != s["base"], "the vector must change the text, or the comparison proves nothing"
    return s["base"], s["plain"]


def test_gated_rows_in_a_mixed_batch_match_hf(setup):
    """Rows 0-5 gated (some open, some shut), row 6 steered without a gate, row 7 unsteered: one engine call."""
    s = setup
    lm, eng, c = s["lm"], s["engine"], s["cond"]
    opened = s["opened"]
    assert any(opened[:6]) and not all(opened[:6]), opened
    base, plain = reference(s)
    gated_hf = hf_ids(lm, s["texts"], ss.steering(lm, s["vec"], alpha=1.0, condition=c))
    for i, o in enumerate(opened):  # the HF path itself: shut rows unsteered, open rows plainly steered
        assert gated_hf[i] == (plain[i] if o else base[i]), i
    want = gated_hf[:6] + [plain[6], base[7]]
    specs = [bv.spec(eng, s["vec"], 1.0, condition=c)] * 6 + [bv.spec(eng, s["vec"], 1.0), None]
    check(s, f"gated mixed batch (open rows {[i for i in range(6) if opened[i]]})", want, run(s, specs))


def test_gated_rows_steering_the_last_blocks_output_match_hf(setup):
    """A gate on mlp_out of the last block, which the engine steers at the final norm's input (its "layer n_layers"):
    shut rows are the unsteered output, open rows HF's gated steering of the MLP's output; with a plain row beside."""
    s = setup
    lm, eng, c = s["lm"], s["engine"], s["cond"]
    opened = s["opened"]
    last = ss.SteeringVector({lm.n_layers - 1: rand_vec(lm, [0], 20 * s["vec"][s["layer"]].norm(), 3)[0]}, "mlp_out")
    base, _ = reference(s)
    gated_hf = hf_ids(lm, s["texts"], ss.steering(lm, last, alpha=1.0, condition=c))
    plain_hf = hf_ids(lm, s["texts"], ss.steering(lm, last, alpha=1.0))
    assert sum(o and g != b for o, g, b in zip(opened[:6], gated_hf, base)) >= 1, "an open row must change"
    for i, o in enumerate(opened[:6]):
        assert gated_hf[i] == (plain_hf[i] if o else base[i]), i
    specs = [bv.spec(eng, last, 1.0, condition=c)] * 6 + [bv.spec(eng, bv.as_resid_pre(last, lm.n_layers), 1.0), None]
    check(s, "gated last block's output (final norm input)", gated_hf[:6] + [plain_hf[6], base[7]], run(s, specs))


def test_composed_rules_with_token_conditions_match_hf(setup):
    """Rules with different vectors: (c & ~t) -> vec, else t -> other (t re-decided per token), else none."""
    s = setup
    lm, eng = s["lm"], s["engine"]
    t, _ = split_condition(lm, s["texts"], s["gate_layer"], seed=11, on="token", reduce="max")
    rules = [(s["cond"] & ~t, s["vec"], 1.0), (t, s["other"], -1.0)]
    hf = hf_ids(lm, s["texts"], ss.conditional_steering(lm, rules))
    base, _ = reference(s)
    assert hf != base
    vl = run(s, [bv.spec(eng, None, rules=rules)] * len(PROMPTS))
    check(s, "rules (c & ~t | t, on=token)", hf, vl)


def test_clamps_match_hf(setup):
    """Rows 0-2 clamped, rows 3-6 clamped where their gate is open (some open, some shut), row 7 not clamped."""
    s = setup
    lm, eng, layer = s["lm"], s["engine"], s["layer"]
    batch = lm.tokenize(s["texts"], padding_side="left")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        h = lm.model(**batch, output_hidden_states=True).hidden_states[layer][real].float()
    mean = h.mean(0)  # a direction the stream really has
    cap = ss.SteeringVector({layer: mean})
    hi = 0.5 * float((h @ (mean / mean.norm())).median())
    base, _ = reference(s)
    clamped = hf_ids(lm, s["texts"][:3], ss.clamping(lm, cap, hi=hi))
    assert clamped != base[:3], "the clamp must bind, or the comparison proves nothing"
    gated = hf_ids(lm, s["texts"][3:7], ss.clamping(lm, cap, hi=hi, condition=s["cond"]))
    opened = s["opened"][3:7]
    assert any(opened) and not all(opened), opened
    assert all(g == b for g, b, o in zip(gated, base[3:7], opened) if not o)  # shut rows: not clamped on HF
    want = clamped + gated + base[7:]
    specs = [bv.spec(eng, None, clamp=Clamp(cap, hi=hi))] * 3 + \
        [bv.spec(eng, None, clamp=Clamp(cap, hi=hi, condition=s["cond"]))] * 4 + [None]
    check(s, f"clamps (hi={hi:.3g}; gate open on rows 3-6: {opened})", want, run(s, specs))


def test_generate_api_with_condition_matches_hf(setup):
    """ss.generate(..., condition=, backend='vllm') returns the HF backend's strings."""
    s = setup
    if s["name"] != "smollm2":
        pytest.skip("the API path is checked once, on the embedded model")
    lm, prompts = s["lm"], PROMPTS[:4]
    kw = dict(vector=s["vec"], alpha=1.0, condition=s["cond"], max_new_tokens=12)
    assert ss.generate(lm, prompts, backend="vllm", **kw) == ss.generate(lm, prompts, **kw)


@pytest.fixture(scope="module")
def chunked(smol):
    """The tiny Qwen2 on an engine whose steps hold 16 tokens: every prompt (about 30 tokens) is split over steps."""
    lm = tiny_qwen2(smol.tokenizer)
    engine = bv.engine_for(lm, max_num_batched_tokens=16, max_num_seqs=8)
    texts = [lm.format_chat(p) for p in PROMPTS]
    ids = bv.prompt_ids(lm, texts, True)
    assert min(len(i) for i in ids) > 16, "the prompts must be longer than a step"
    yield dict(lm=lm, engine=engine, texts=texts, ids=ids, name="qwen2-tiny-chunked", vec=rand_vec(lm, [2], 4.0, 0))
    engine.close()


def test_chunked_prefill_token_conditions_and_generated_positions_are_exact(chunked):
    """Split prompts: on="token" gates (running state carried from chunk to chunk) and a prompt gate steering only
    generated tokens equal HF; a prompt gate that must steer the prompt itself is reported, not silently wrong."""
    s = chunked
    lm, eng, vec = s["lm"], s["engine"], s["vec"]
    tok, _ = split_condition(lm, s["texts"], 1, seed=11, on="token", reduce="mean")
    hf = hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0, condition=tok))
    check(s, "chunked prefill, on=token", hf, run(s, [bv.spec(eng, vec, 1.0, condition=tok)] * len(PROMPTS)))
    cond, opened = split_condition(lm, s["texts"], 1, seed=5)
    hf = hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0, positions="generated", condition=cond))
    vl = run(s, [bv.spec(eng, vec, 1.0, "generated", condition=cond)] * len(PROMPTS))
    check(s, f"chunked prefill, on=prompt, positions=generated (open {opened})", hf, vl)
    eng.generate_ids(s["ids"][:1], [bv.spec(eng, vec, 1.0, condition=cond)], bv.stop_params(lm, 2, False, 1.0, None))
    assert any("split over engine steps" in b for b in eng.stats()["bad"])
