"""The vLLM worker's gates and clamps (engine/steerscope_vllm_gates.py) against the HF path's own functions, and the
refusals of conditions on the vLLM client side. No engine needed: the engine-side modules import only torch."""

from __future__ import annotations

import sys

import pytest
import torch

import steerscope as ss
from steerscope.backends import vllm as bv
from steerscope.backends import vllm_conditional as bv_conditional
from steerscope.backends.base import Addition, Request
from steerscope.backends.vllm_conditional import compiled_refusal, gated_spec
from steerscope.conditional.clamp import Clamp
from steerscope.conditional.gate import reduce_prompt, reduce_running
from steerscope.errors import BackendError, ConditionError
from steerscope.steer import clip_along

sys.path.insert(0, str(bv.ENGINE_DIR))
import steerscope_vllm_gates as vg
import steerscope_vllm_spec as vs

D = 8


def leaf(on: str, reduce: str, threshold: float = 0.1, seed: int = 0) -> tuple[ss.Condition, vg.Leaf]:
    g = torch.Generator().manual_seed(seed)
    c = ss.Condition(torch.randn(D, generator=g), layer=1, threshold=threshold, reduce=reduce, on=on,
                     center=torch.randn(D, generator=g), scale=1.7)
    parsed = vg.parse_gate(c.to_dict())
    assert isinstance(parsed, vg.Leaf)
    return c, parsed


@pytest.mark.parametrize("reduce", ["mean", "max", "last"])
def test_token_decisions_carried_over_steps_equal_hf_running_reduction(reduce):
    c, lf = leaf("token", reduce)
    x = torch.randn(1, 9, D)
    scores, _ = reduce_running(c.project(x), torch.ones(1, 9, dtype=torch.bool), reduce, None)
    st = vg.fresh()
    got = [vg.leaf_decision(lf, vg.score(lf, x[0, a:b]), torch.arange(a, b), 5, st) for a, b in ((0, 5), (5, 6),
                                                                                                 (6, 9))]
    assert torch.equal(torch.cat(got), (scores > c.threshold)[0])  # type: ignore[arg-type]


@pytest.mark.parametrize("reduce", ["mean", "max", "last"])
def test_prompt_decision_equals_hf_and_is_kept_for_generated_tokens(reduce):
    c, lf = leaf("prompt", reduce, threshold=0.0)
    x = torch.randn(1, 6, D)
    want = bool(reduce_prompt(c.project(x), torch.ones(1, 6, dtype=torch.bool), reduce)[0] > c.threshold)
    st = vg.fresh()
    first = vg.leaf_decision(lf, vg.score(lf, x[0]), torch.arange(6), 6, st)
    later = vg.leaf_decision(lf, vg.score(lf, torch.randn(1, D)), torch.tensor([6]), 6, st)
    assert first is not None and later is not None
    assert first.tolist() == [want] * 6 and later.tolist() == [want]


def test_a_split_prompt_is_undecided_until_its_last_token():
    c, lf = leaf("prompt", "mean", threshold=0.0)
    x = torch.randn(1, 6, D)
    want = bool(reduce_prompt(c.project(x), torch.ones(1, 6, dtype=torch.bool), "mean")[0] > 0)
    st = vg.fresh()
    assert vg.leaf_decision(lf, vg.score(lf, x[0, :4]), torch.arange(4), 6, st) is None
    rest = vg.leaf_decision(lf, vg.score(lf, x[0, 4:]), torch.arange(4, 6), 6, st)
    assert rest is not None and rest.tolist() == [want] * 2


def test_composed_gates_and_first_match_wins():
    a, b = ss.Condition(torch.ones(D), 0, 0.0), ss.Condition(-torch.ones(D), 0, 0.0)
    gates = [vg.parse_gate((a & ~b).to_dict()), None]
    la, lb = vg.leaves(gates[0])
    values = {id(la): torch.tensor([True, True, False]), id(lb): torch.tensor([False, True, False])}
    w = vg.rule_weights(gates, values, 3)
    assert w[0].tolist() == [1.0, 0.0, 0.0] and w[1].tolist() == [0.0, 1.0, 1.0]


def test_clip_rows_equals_hf_clip_along():
    x, r = torch.randn(5, D), torch.randn(D)
    r = r / r.norm()
    keep = torch.tensor([True, False, True, True, False])
    want = torch.where(keep[:, None], clip_along(x[None], r, torch.tensor(-0.2), torch.tensor(0.3))[0], x)
    assert torch.equal(vg.clip_rows(x, r, -0.2, 0.3, keep), want)


@pytest.mark.parametrize("raw, words", [
    ({"vectors": [["v", 1]], "condition": {"direction": [0.0, 0.0], "layer": 0, "threshold": 0}}, "non-zero"),
    ({"vectors": [["v", 1]], "condition": {"kind": "xor"}}, "not known"),
    ({"condition": {"direction": [1.0], "layer": 0, "threshold": 0}}, "give vectors"),
    ({"clamp": {"vector": "v"}}, "lo, hi"),
    ({"clamp": {"vector": "v", "lo": 2, "hi": 1}}, "above"),
    ({"clamp": {"vector": "w", "hi": 1}}, "unknown vector"),
    ({"rules": [{"condition": None}]}, "each rule"),
    ({"vectors": [["v", 1]], "condition": {"direction": [1.0], "layer": 0, "threshold": "x"}}, "number"),
])
def test_engine_refuses_bad_gated_specs_with_a_reason(raw, words):
    with pytest.raises(ValueError, match=words):
        vs.parse_spec(raw, {"v"})


def test_gated_spec_refuses_a_gate_above_the_steering_layer():
    vec = ss.SteeringVector({2: torch.ones(D)})
    with pytest.raises(ConditionError, match="unsteered residual"):
        gated_spec(lambda v: "v", 4, [(ss.Condition(torch.ones(D), 3, 0.0), vec, 1.0)])
    with pytest.raises(BackendError, match="one number per request"):
        gated_spec(lambda v: "v", 4, [], clamp=Clamp(vec, hi=[1.0, 2.0]))
    spec = gated_spec(lambda v: "v", 4, [(ss.Condition(torch.ones(D), 2, 0.0), vec, 1.0)], clamp=Clamp(vec, hi=1.0))
    assert vs.parse_spec(spec, {"v"}).gated  # type: ignore[union-attr]


def test_compiled_engine_refuses_what_its_graph_cannot_run_before_starting(tiny_llama):
    """Client and engine give the same one-line reason for four rules and five conditions in one request, and both
    accept three rules and a clamp gated by prompt and token conditions (run in the compiled graph)."""
    d = tiny_llama.d_model
    vec = ss.SteeringVector({2: torch.ones(d)})

    def cond(seed: int, on: str = "prompt") -> ss.Condition:
        return ss.Condition(torch.randn(d, generator=torch.Generator().manual_seed(seed)), 1, 0.0, on=on)

    five = cond(1) | cond(2) | ~cond(3) | (cond(4) & cond(5))
    eng = bv.Engine("unused", compiled=True)
    cases = [(dict(rules=[(cond(0), vec, 1.0), (cond(1), vec, 2.0), (cond(2), vec, 3.0), (None, vec, -1.0)]),
              "4 rules"),
             (dict(condition=five), "5 conditions in one gate"),
             (dict(condition=cond(1) | cond(2) | cond(3), clamp=Clamp(vec, hi=1.0, condition=cond(4) & cond(5))),
              "5 conditions in one gate")]  # the rule's and the clamp's gates share the 4 slots
    for kw, words in cases:
        with pytest.raises(BackendError, match=words) as e:
            bv.spec(eng, None if "rules" in kw else vec, 1.0, **kw)
        assert "compiled=False" in str(e.value) and "\n" not in str(e.value)
        rules = kw.get("rules") or ([(kw["condition"], vec, 1.0)] if "condition" in kw else [])
        raw = gated_spec(lambda v: "v", 4, rules, clamp=kw.get("clamp"))
        assert vg.compiled_refusal(vs.parse_spec(raw, {"v"})) == str(e.value)  # the engine says the same
    assert bv_conditional.COMPILED_LEAVES == vg.COMPILED_LEAVES  # the client's copies of the graph's slot sizes
    assert bv_conditional.COMPILED_RULES == vg.COMPILED_RULES
    three = [(cond(1), vec, 1.0), (cond(2, "token"), vec, -1.0), (None, vec, 0.5)]
    assert compiled_refusal([g for g, _, _ in three], Clamp(vec, hi=1.0, condition=cond(3))) is None
    assert vg.compiled_refusal(vs.parse_spec(gated_spec(lambda v: "v", 4, three), {"v"})) is None
    ok = (cond(1) | ~cond(2, "token")) & cond(3)
    cap = Clamp(vec, hi=1.0, condition=~cond(4, "token"))
    assert compiled_refusal([ok], cap) is None and compiled_refusal([], Clamp(vec, lo=-1.0)) is None
    assert vg.compiled_refusal(vs.parse_spec(gated_spec(lambda v: "v", 4, [(ok, vec, 1.0)], clamp=cap), {"v"})) is None
    assert "without gate sites" in str(vg.compiled_refusal(vs.parse_spec(gated_spec(
        lambda v: "v", 4, [(ok, vec, 1.0)]), {"v"}), gate_sites=False))
    with pytest.raises(BackendError, match="5 conditions"):  # refused before an engine starts
        bv.VLLMEngine(compiled=True).generate(tiny_llama, [Request("Hi", Addition(vec, 1.0, condition=five))])


def test_the_truth_table_is_the_gate_over_its_leaves_decisions():
    a, b, c = (vg.parse_gate({"direction": [1.0] * D, "layer": 0, "threshold": float(t)}) for t in range(3))
    gate = ("or", ("and", a, ("not", b)), c)
    table = vg.truth_table(gate, [a, b, c], k=4)
    for bits in range(16):
        x, y, z = (bool(bits >> i & 1) for i in range(3))
        assert table[bits] == float((x and not y) or z), bits


def test_a_split_prompt_chunk_is_left_unsteered_even_under_a_negated_gate():
    """The worker's step function: a chunk without the prompt's end is not steered (and reported), the rest is."""
    never = {"direction": [1.0] * D, "layer": 0, "threshold": 1e9}  # ~never: open once decided
    spec = vs.parse_spec({"vectors": [["v", 1.0]], "condition": {"kind": "not", "of": never}}, {"v"})
    vectors = {"v": {0: torch.ones(D)}}
    states = {id(leaf): vg.fresh() for leaf in vg.spec_leaves(spec)}
    hidden, bad = torch.randn(6, D), []
    first, _ = vg.apply_rows([vg.Row(0, 4, torch.arange(4), 6, spec, states, {})], 0, hidden[:4], None, vectors, bad)
    assert torch.equal(first, hidden[:4]) and len(bad) == 1 and "split" in bad[0]
    rest, _ = vg.apply_rows([vg.Row(0, 2, torch.arange(4, 6), 6, spec, states, {})], 0, hidden[4:], None, vectors, bad)
    assert torch.equal(rest, hidden[4:] + 1) and len(bad) == 1


def test_no_gate_code_benchmark_times_the_plain_step_path():
    """``bench_vllm_gates.py --no-gate-code`` runs the worker's own ``_ss_rows`` on plain specs (no row may come
    out of it: the function asserts that) and returns positive per-step and per-parse times."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vllm_gates.py"
    spec = importlib.util.spec_from_file_location("bench_vllm_gates", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.no_gate_code(n_requests=4, n_layers=3, reps=5)
    assert out["seconds_per_step"] > 0 and out["parse_seconds_per_request"] > 0 and out["n_requests"] == 4
