"""vLLM backend parity: greedy fp32, token for token equal to steerscope's HF path.

Each case runs on an eager engine (worker hooks) and on a compiled one (vLLM's torch.compile, with
the graph-safe steering buffers of ``steerscope_vllm_plugin`` built into the model before tracing).

8 prompts x 32 new tokens, on SmolLM2-135M and on a tiny random Qwen2 (SmolLM2's tokenizer):
unsteered, one layer, three layers (layer 0 included: vLLM's residual is None there), a mixed
continuous batch (each request its own vector and positions, some none) and directional ablation.
The HF reference is ``lm.model.generate`` under ``ss.steering`` / ``ss.ablation`` (independent
code: HF hooks on the HF model vs. vLLM worker hooks on vLLM's own model). Skipped when the engine
environment (``steerscope vllm-setup``) is absent; .ci/run creates it.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import steerscope as ss
from conftest import ALL_CPUS, every_cpu
from steerscope.backends import vllm as bv
from steerscope.errors import BackendError

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bv.engine_python(required=False) is None,
                                                   reason="no vLLM engine environment (steerscope vllm-setup)")]

PROMPTS = ["Tell me about your weekend.", "What is the capital of France?", "Write a haiku about rain.",
           "How do I bake bread?", "Explain photosynthesis to a child.", "Give me three tips for sleeping well.",
           "What is 17 times 23?", "Describe the sea in one sentence."]
N_NEW = 32


def hf_ids(lm, texts, ctx=None) -> list[list[int]]:
    """New token ids from HF generate (batch of all texts, left padded), cut after the first EOS."""
    batch = lm.tokenize(texts, padding_side="left")
    with ctx or nullcontext(), torch.no_grad():
        out = lm.model.generate(**batch, max_new_tokens=N_NEW, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    eos = lm.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(tokens equal position by position, total positions over the longer of each pair)."""
    eq = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return eq, sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))


def rand_vec(lm, layers, norm, seed) -> ss.SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return ss.SteeringVector({layer: norm * (v := torch.randn(lm.d_model, generator=g)) / v.norm() for layer in layers})


def tiny_qwen2(tokenizer) -> ss.LM:
    """A 4-layer random Qwen2 (q/k/v biases, GQA) with head_dim 64: vLLM's CPU attention has no head_dim 16 kernel."""
    import transformers as tr

    torch.manual_seed(3)
    cfg = tr.Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    model = tr.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norm weights and biases, so the fused add + RMSNorm path is exercised
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return ss.from_hf(model, tokenizer, name="tiny-qwen2-d128")


@pytest.fixture(scope="module", params=["smollm2", "qwen2-tiny", "smollm2-compiled", "qwen2-tiny-compiled",
                                        "qwen2-tiny-tp2"])
def setup(request, smol):
    """Eager engines (hooks), compiled ones (vLLM's torch.compile with the graph-safe steering buffers), and
    tensor parallelism: the tiny Qwen2 split over 2 CPU workers (the mp executor; each rank bound to a CPU)."""
    if request.param.endswith("-tp2") and len(ALL_CPUS) < 2:
        pytest.skip("tensor parallelism over 2 CPU workers needs 2 CPUs")
    if request.param.startswith("smollm2"):
        lm, layers1, layers3, norm = smol, [12], [0, 12, 20], 10.0
    else:
        lm = tiny_qwen2(smol.tokenizer)
        layers1, layers3, norm = [2], [0, 1, 3], 4.0
    compiled = request.param.endswith("-compiled")
    kwargs = {"tensor_parallel_size": 2} if request.param.endswith("-tp2") else {}
    # the engine ss.generate(backend="vllm") uses; compiled with the gate sites (they must leave plain steering be)
    with every_cpu() if kwargs else nullcontext():  # under pytest -n the worker has one CPU; the ranks need two
        engine = bv.engine_for(lm, compiled=compiled, **({"gate_sites": True} if compiled else {}), **kwargs)
    if compiled:
        # really compiled (else this would only repeat the eager cases through other hooks)
        assert engine.info.get("graph") is True and engine.info["enforce_eager"] is False, engine.info
        assert "NONE" not in engine.info["compilation_mode"].upper(), engine.info
    texts = [lm.format_chat(p) for p in PROMPTS]
    yield dict(lm=lm, engine=engine, texts=texts, ids=bv.prompt_ids(lm, texts, True),
               one=rand_vec(lm, layers1, norm, 0), three=rand_vec(lm, layers3, norm / 2, 1), name=request.param)
    engine.close()


def run(s, specs):
    params = bv.stop_params(s["lm"], N_NEW, False, 1.0, None)
    out, _ = s["engine"].generate_ids(s["ids"], specs, params)
    return out


def check(s, case, hf, vl):
    eq, total = agreement(hf, vl)
    print(f"parity {s['name']} {case}: {eq}/{total} tokens equal")
    assert hf == vl, f"{case}: {eq}/{total} tokens equal"


def test_unsteered_matches_hf(setup):
    s = setup
    check(s, "unsteered", hf_ids(s["lm"], s["texts"]), run(s, [None] * len(PROMPTS)))


@pytest.mark.parametrize("which", ["one", "three"])
def test_steered_matches_hf(setup, which):
    s = setup
    vec, lm = s[which], s["lm"]
    hf = hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0))
    base = hf_ids(lm, s["texts"])
    assert hf != base, "the vector must change the text, or the comparison proves nothing"
    check(s, f"{which} layer(s)", hf, run(s, [bv.spec(s["engine"], vec, 1.0)] * len(PROMPTS)))


def test_the_last_blocks_output_steers_at_the_final_norm_as_hf(setup):
    """mlp_out / resid_post of the last block has no decoder layer above it: the engine adds it at the final norm's
    input (its "layer n_layers"). HF steers the vectors where they are (the MLP's output; the block's output), in a
    mixed batch with unsteered rows, a vector also at layer 0 and steering of the generated tokens only."""
    s = setup
    lm, eng = s["lm"], s["engine"]
    last = lm.n_layers - 1
    norm = 200.0 if s["name"].startswith("smollm2") else 8.0
    mlp = ss.SteeringVector({last: rand_vec(lm, [0], norm, 5)[0]}, "mlp_out")
    post = ss.SteeringVector({0: rand_vec(lm, [0], norm / 4, 6)[0], last: rand_vec(lm, [0], norm, 7)[0]}, "resid_post")
    configs = [(mlp, 1.0, "all"), None, (post, 1.0, "all"), (mlp, -1.0, "generated"), None, (post, 1.0, "all"),
               (mlp, 1.0, "all"), None]
    vl = run(s, [None if c is None else bv.spec(eng, bv.as_resid_pre(c[0], lm.n_layers), c[1], c[2])
                 for c in configs])
    hf: list[list[int]] = [[] for _ in PROMPTS]
    base = hf_ids(lm, s["texts"])
    for key in {None if c is None else (id(c[0]), c[1], c[2]) for c in configs}:
        rows = [i for i, c in enumerate(configs) if (None if c is None else (id(c[0]), c[1], c[2])) == key]
        c = configs[rows[0]]
        ctx = None if c is None else ss.steering(lm, c[0], c[1], c[2])
        for i, ids in zip(rows, hf_ids(lm, [s["texts"][i] for i in rows], ctx)):
            hf[i] = ids
    changed = [i for i, c in enumerate(configs) if c is not None and hf[i] != base[i]]
    assert len(changed) >= 4, f"the vectors must change the text, or parity proves nothing (rows {changed} changed)"
    check(s, "last block's output (final norm input), mixed batch", hf, vl)
    if s["name"].endswith("-compiled"):  # the graph's final-norm site is ungated: a gated request there is refused
        gate = ss.Condition(rand_vec(lm, [0], 1.0, 8)[0], layer=0, threshold=0.0)
        with pytest.raises(BackendError) as e:
            bv.spec(eng, bv.as_resid_pre(mlp, lm.n_layers), 1.0, condition=gate)
        assert "compiled=False" in str(e.value) and "\n" not in str(e.value)


def test_mixed_batch_matches_single_configurations(setup):
    """Each request its own vector/alpha/positions (some none), all in one engine call."""
    s = setup
    lm, eng = s["lm"], s["engine"]
    configs = [None, (s["one"], 1.0, "all"), (s["three"], 1.0, "all"), None, (s["one"], -1.0, "all"),
               (s["one"], 1.5, "prompt"), (s["three"], 1.0, "generated"), None]
    specs = [None if c is None else bv.spec(eng, c[0], c[1], c[2]) for c in configs]
    vl = run(s, specs)
    hf: list[list[int]] = [[] for _ in PROMPTS]
    for c in {c if c is None else (id(c[0]), c[1], c[2]) for c in configs}:
        rows = [i for i, ci in enumerate(configs) if (ci if ci is None else (id(ci[0]), ci[1], ci[2])) == c]
        ctx = None if c is None else ss.steering(lm, configs[rows[0]][0], configs[rows[0]][1], configs[rows[0]][2])
        for i, ids in zip(rows, hf_ids(lm, [s["texts"][i] for i in rows], ctx)):
            hf[i] = ids
    check(s, "mixed batch", hf, vl)


def test_ablation_matches_hf(setup):
    s = setup
    lm, direction = s["lm"], s["one"]
    hf = hf_ids(lm, s["texts"], ss.ablation(lm, direction))
    check(s, "ablation", hf, run(s, [bv.spec(s["engine"], None, ablate=direction)] * len(PROMPTS)))


def test_hooks_ran_and_generate_api_matches(setup):
    """The hooks were not bypassed (eager model), and ss.generate(backend='vllm') returns HF's strings."""
    s = setup
    lm, vec = s["lm"], s["one"]
    prompts = PROMPTS[:3]
    if s["name"] == "smollm2":  # ss.generate through the same cached engine (engine_for)
        assert ss.generate(lm, prompts, vector=vec, max_new_tokens=12, backend="vllm") == \
            ss.generate(lm, prompts, vector=vec, max_new_tokens=12)
    else:
        run(s, [bv.spec(s["engine"], vec, 1.0)] * len(PROMPTS))
    stats = s["engine"].stats()
    assert stats["steered_layer_calls"] > 0
    if s["name"].endswith("-tp2"):  # every rank steered, and holds the same steered residual stream
        ranks = stats["ranks"]
        assert len(ranks) == 2 and all(r["steered_layer_calls"] > 0 for r in ranks), ranks
        assert ranks[0]["last_steered_stream_sum"] == ranks[1]["last_steered_stream_sum"] is not None, ranks


def split_somewhere(lm, texts, layers, reduce):
    """The first (layer, seed) whose ``reduce`` scores split the prompts with a clear gap (test_vllm_conditional's
    split_condition): with a chat template the prompts share a prefix and a suffix, so in early layers the last
    token, or the max over tokens, is often the same for every prompt."""
    from test_vllm_conditional import split_condition

    for layer in layers:
        for seed in (3, 11, 17):
            try:
                return split_condition(lm, texts, layer, seed=seed, reduce=reduce)[0]
            except AssertionError:
                continue
    raise AssertionError(f"no layer of {list(layers)} splits the prompts on their {reduce} score")


def test_compiled_conditions_in_a_mixed_batch_match_hf(setup):
    """The compiled engine's in-graph gates (steerscope_vllm_plugin.gated_add): rows 0-5 gated by a prompt
    condition (some open, some shut), row 6 plainly steered, row 7 unsteered, in one engine call, and
    ``ss.generate(..., compiled=True, condition=)``; ``on="token"`` conditions (a running max composed with the
    prompt condition, a running mean) in one batch; what the graph cannot run (several rules) is refused in one
    line before it is sent; then (on the tiny Qwen2) a gate composed of three prompt conditions (last / max / mean
    reduce, ``|`` and ``~``) steering generated tokens only and clamps (plain on three rows, gated on four)."""
    s = setup
    if not s["name"].endswith("-compiled"):
        pytest.skip("conditions on the eager engine: test_vllm_conditional")
    from steerscope.conditional.clamp import Clamp
    from steerscope.errors import BackendError
    from test_vllm_conditional import split_condition

    lm, eng, vec = s["lm"], s["engine"], s["one"]
    gate_layer = 6 if s["name"].startswith("smollm2") else 1
    cond, opened = split_condition(lm, s["texts"], gate_layer, seed=5)
    assert any(opened[:6]) and not all(opened[:6]), opened
    base, plain = hf_ids(lm, s["texts"]), hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0))
    gated = hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0, condition=cond))
    assert [g == (p if o else b) for g, p, b, o in zip(gated, plain, base, opened)] == [True] * len(PROMPTS)
    specs = [bv.spec(eng, vec, 1.0, condition=cond)] * 6 + [bv.spec(eng, vec, 1.0), None]
    check(s, f"compiled gated mixed batch (open rows {[i for i in range(6) if opened[i]]})",
          gated[:6] + [plain[6], base[7]], run(s, specs))
    kw = dict(vector=vec, alpha=1.0, condition=cond, max_new_tokens=12)  # the public API, the same cached engine
    assert ss.generate(lm, PROMPTS[:4], backend="vllm", compiled=True, **kw) == ss.generate(lm, PROMPTS[:4], **kw)
    # on="token" conditions, each token decided on the running max / mean of its request so far, in one batch with a
    # prompt condition composed with a token one
    t_max, _ = split_condition(lm, s["texts"], gate_layer, seed=11, on="token", reduce="max")
    t_mean, _ = split_condition(lm, s["texts"], gate_layer, seed=3, on="token", reduce="mean")
    both = cond & ~t_max
    hf = hf_ids(lm, s["texts"][:4], ss.steering(lm, vec, alpha=1.0, condition=both)) + \
        hf_ids(lm, s["texts"][4:7], ss.steering(lm, vec, alpha=1.0, condition=t_mean)) + base[7:]
    assert hf[:7] != base[:7] and hf[:7] != plain[:7], "the token gates must open somewhere and shut somewhere"
    specs = [bv.spec(eng, vec, 1.0, condition=both)] * 4 + [bv.spec(eng, vec, 1.0, condition=t_mean)] * 3 + [None]
    check(s, "compiled on=token gates (c & ~t_max rows 0-3, t_mean rows 4-6)", hf, run(s, specs))
    # three rules, first match wins, a different vector in the second: each token takes its first open rule's delta
    other = rand_vec(lm, [min(vec.layers), min(vec.layers) + 1], float(vec[min(vec.layers)].norm()), 7)
    rules = [(both, vec, 1.0), (t_mean, other, 1.0), (None, vec, -0.5)]
    hf = hf_ids(lm, s["texts"][:7], ss.conditional_steering(lm, rules)) + base[7:]
    assert hf[:7] != base[:7] and hf[:7] != plain[:7]
    check(s, "compiled rules (c & ~t_max -> v, t_mean -> w, else -v/2; rows 0-6)", hf,
          run(s, [bv.spec(eng, None, rules=rules)] * 7 + [None]))
    with pytest.raises(BackendError, match="4 rules") as e:  # what the graph cannot run is refused before it is sent
        bv.spec(eng, None, rules=rules + [(None, vec, -1.0)])
    assert "compiled=False" in str(e.value) and "\n" not in str(e.value)
    if s["name"].startswith("smollm2"):
        return  # composed gates and clamps on the tiny Qwen2 only (the graph code is the same; CI time)
    last, top = (split_somewhere(lm, s["texts"], range(gate_layer, min(vec.layers) + 1), r) for r in ("last", "max"))
    gate = (last | ~top) & ~cond
    hf = hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0, positions="generated", condition=gate))
    assert hf != base and hf != hf_ids(lm, s["texts"], ss.steering(lm, vec, alpha=1.0, positions="generated"))
    check(s, "compiled composed gate, generated positions", hf,
          run(s, [bv.spec(eng, vec, 1.0, "generated", condition=gate)] * len(PROMPTS)))
    assert not eng.stats()["bad"], eng.stats()["bad"]
    layer = min(vec.layers)  # clamps, as test_vllm_conditional's: plain on rows 0-2, gated on 3-6, none on 7
    batch = lm.tokenize(s["texts"], padding_side="left")
    with torch.no_grad():
        h = lm.model(**batch, output_hidden_states=True).hidden_states[layer][batch["attention_mask"].bool()].float()
    cap = ss.SteeringVector({layer: h.mean(0)})
    hi = 0.5 * float((h @ (h.mean(0) / h.mean(0).norm())).median())
    clamped = hf_ids(lm, s["texts"][:3], ss.clamping(lm, cap, hi=hi))
    gated_clamp = hf_ids(lm, s["texts"][3:7], ss.clamping(lm, cap, hi=hi, condition=cond))
    assert clamped != base[:3] and gated_clamp != base[3:7], "the clamps must bind, or the comparison proves nothing"
    specs = [bv.spec(eng, None, clamp=Clamp(cap, hi=hi))] * 3 + \
        [bv.spec(eng, None, clamp=Clamp(cap, hi=hi, condition=cond))] * 4 + [None]
    check(s, "compiled clamps", clamped + gated_clamp + base[7:], run(s, specs))


def test_seeded_samples_do_not_depend_on_chunked_prefill(setup):
    """A batch of long prompts is prefilled in chunks, and vLLM rewinds a seeded row's generator after every
    sample it discards: on CPU that needs steerscope's rewindable generators (vLLM alone fails with "CPU Generator
    does not use offset"). Each row's sampled tokens must equal the same request sampled on its own."""
    s = setup
    if s["name"] != "qwen2-tiny":
        pytest.skip("one eager engine shows it")
    lm, engine = s["lm"], s["engine"]
    filler = " ".join(f"word{j}" for j in range(120))
    texts = [lm.format_chat(f"{i}. {PROMPTS[i % len(PROMPTS)]} {filler}") for i in range(24)]
    ids = bv.prompt_ids(lm, texts, True)
    assert sum(map(len, ids)) > 4096, "the batch must exceed the CPU engine's token budget (4096) to be chunked"
    params = {**bv.stop_params(lm, 8, True, 1.0, None), "seeds": bv.row_seeds(7, len(ids))}
    before = engine.stats()["rewindable_rows"]
    batch, _ = engine.generate_ids(ids, [None] * len(ids), params)
    assert engine.stats()["rewindable_rows"] > before, "no prompt was prefilled in chunks: the test shows nothing"
    alone = [engine.generate_ids([x], [None], {**params, "seeds": [seed]})[0][0]
             for x, seed in zip(ids, params["seeds"])]
    assert batch == alone
