"""The graph-safe steering sites of ``steerscope_vllm_plugin`` under torch.compile, without vLLM.

A toy decoder with vLLM's layer signature ``(positions, hidden, residual) -> (hidden, residual)``
is given the plugin's buffers and pre-hooks, compiled once, and then steered only by writing the
buffers (as the worker extension does each step). The compiled outputs must equal an eager
computation of the same steering (independent: plain tensor code, no hooks), so the buffer reads
are in the traced graph and later writes are seen without retracing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "steerscope" / "backends" / "engine"))
import steerscope_vllm_plugin as plugin

D, LAYERS = 16, 3


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.Linear(D, D)
        self.mlp = torch.nn.Linear(D, D)

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        hidden = self.mlp(torch.tanh(self.self_attn(residual)))
        return hidden, residual


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, positions, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()


def reference(toy: Toy, x: torch.Tensor, delta: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """delta [layers tokens d] added to resid_pre; r [tokens d] unit rows projected out (0 rows: none)."""
    def proj(t):
        return t if r is None else t - (t * r).sum(-1, keepdim=True) * r

    with torch.no_grad():
        resid = None
        hidden = x
        for i, layer in enumerate(toy.model.layers):
            pre = (hidden if resid is None else hidden + resid) + delta[i]
            pre = proj(pre)
            a = proj(layer.self_attn(pre))
            hidden = proj(layer.mlp(torch.tanh(a)))
            resid = pre
        return hidden + resid


@pytest.mark.parametrize("ablate", [False, True])
def test_buffers_written_after_compilation_steer_the_compiled_model(ablate):
    torch.manual_seed(0)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, ablate)
    compiled = torch.compile(toy.model, backend="aot_eager", dynamic=True, fullgraph=True)
    x = torch.randn(7, D)
    pos = torch.arange(7)
    with torch.no_grad():
        first = compiled(pos, x)  # traced now, with every buffer zero
    zero = torch.zeros(LAYERS, 7, D)
    torch.testing.assert_close(first, reference(toy, x, zero, None), rtol=0, atol=0)
    # two requests: tokens 0-3 request 0 (rows 1 prompt / 2 generated), tokens 4-6 request 1 unsteered
    rows = torch.tensor([1, 1, 2, 2, 0, 0, 0])
    table = torch.randn(LAYERS, sites.rows, D)
    table[:, 0] = 0
    sites.table[:LAYERS].copy_(table)  # the toy has no final norm: block LAYERS (its site) stays 0
    sites.idx.zero_()
    sites.idx[:7] = rows
    r = None
    if ablate:
        rt = torch.randn(sites.rows, D)
        rt = rt / rt.norm(dim=-1, keepdim=True)
        rt[0] = 0
        sites.rtable.copy_(rt)
        r = rt[rows]
    with torch.no_grad():
        steered = compiled(pos, x)
    expect = reference(toy, x, table[:, rows], r)
    torch.testing.assert_close(steered, expect, rtol=1e-5, atol=1e-5)
    assert (steered - first).abs().max() > 1e-2  # the write changed the compiled output
    torch.testing.assert_close(steered[4:], first[4:], rtol=0, atol=0)  # the unsteered request is untouched


def _step(sites, compiled, x, rows, slots, flags):
    """One engine step as the worker writes it: each token's steering row, gate slot and flags (prompt token, last
    prompt token), ``gany`` (some token of the step is gated); then the compiled model's output."""
    sites.idx.zero_()
    sites.idx[: len(rows)] = torch.tensor(rows)
    sites.gslot.zero_()
    sites.gslot[: len(slots)] = torch.tensor(slots)
    sites.gany.fill_(bool(sites.gslot.any()))
    sites.gtok.zero_()
    sites.gtok[: len(flags)] = torch.tensor(flags, dtype=torch.float32)
    with torch.no_grad():
        return compiled(torch.arange(x.shape[0]), x)


def _leaf(g: torch.Generator, layer: int, reduce: str, threshold: float) -> dict:
    return {"kind": "condition", "direction": torch.randn(D, generator=g).tolist(), "layer": layer,
            "threshold": threshold, "reduce": reduce, "on": "prompt",
            "center": torch.randn(D, generator=g).tolist(), "scale": 0.7}


def _resid_pre(toy: Toy, x: torch.Tensor) -> list[torch.Tensor]:
    """Unsteered resid_pre of every layer (each token is independent in the toy: no attention)."""
    out, resid, hidden = [], None, x
    with torch.no_grad():
        for layer in toy.model.layers:
            pre = hidden if resid is None else hidden + resid
            out.append(pre)
            hidden, resid = layer.mlp(torch.tanh(layer.self_attn(pre))), pre
    return out


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: what vLLM compiles with
def test_gates_in_the_compiled_graph_equal_the_eager_gate_code_across_steps_and_split_prompts(backend):
    """Prompt conditions evaluated inside a compiled graph (``gated_add``) decide as the eager worker's gate code
    (``steerscope_vllm_gates.leaf_decision`` / ``gate_open`` on the same scores), hold the decision for later
    steps, carry a split prompt's running mean to its last chunk (earlier chunk shut), and leave ungated rows
    plainly steered. Steering at layer 2 only, conditions at layers 0 and 1 (they read unsteered residuals)."""
    import steerscope_vllm_adapter as adapter
    import steerscope_vllm_gates as gates
    from steerscope_vllm_spec import parse_spec

    torch.manual_seed(0)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, False, gates=True)
    compiled = torch.compile(toy.model, backend=backend, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    # request A: 3 prompt tokens, leaf mean@1; B: 2 tokens, (last@0 and not max@1); C: ungated, steered;
    # D: a 4-token prompt split 2 + 2 over two steps, leaf mean@0. Thresholds from the reference scores below.
    x1 = torch.randn(9, D, generator=g)  # step 1: A 0-2, B 3-4, C 5-6, D 7-8 (D's first chunk)
    pre1 = _resid_pre(toy, x1)
    la, lb0, lb1, ld = _leaf(g, 1, "mean", 0), _leaf(g, 0, "last", 0), _leaf(g, 1, "max", 0), _leaf(g, 0, "mean", 0)
    x2 = torch.randn(5, D, generator=g)  # step 2: A, B, C one generated token each; D's second chunk (2 tokens)
    pre2 = _resid_pre(toy, x2)

    def scores(leaf_raw, pre, rows):
        leaf = gates.parse_gate(leaf_raw)
        return gates.score(leaf, pre[leaf.layer][rows])

    a = scores(la, pre1, slice(0, 3)).mean()
    b0, b1 = scores(lb0, pre1, slice(3, 5))[-1], scores(lb1, pre1, slice(3, 5)).max()
    dm = torch.cat([scores(ld, pre1, slice(7, 9)), scores(ld, pre2, slice(3, 5))]).mean()
    la["threshold"], lb0["threshold"] = float(a) - 0.1, float(b0) - 0.1  # A open; B's first leaf open
    lb1["threshold"], ld["threshold"] = float(b1) - 0.1, float(dm) - 0.1  # B's second open, so ~it shuts B; D open
    vec = torch.randn(D, generator=g)
    table = torch.zeros(LAYERS, sites.rows, D)
    table[2, 1:9] = vec  # requests 0-3 (rows 1+2i prompt, 2+2i generated) steered by the same vector at layer 2
    sites.table[:LAYERS].copy_(table)  # the toy has no final norm: block LAYERS (its site) stays 0
    specs = [parse_spec({"rules": [{"condition": la, "vectors": [["v", 1.0]]}]}),
             parse_spec({"rules": [{"condition": {"kind": "and", "a": lb0, "b": {"kind": "not", "of": lb1}},
                                    "vectors": [["v", 1.0]]}]}),
             parse_spec({"rules": [{"condition": ld, "vectors": [["v", 1.0]]}]})]
    for slot, spec in zip((1, 2, 3), specs):
        adapter._init_slot(sites, slot, spec, {})

    def step(x, rows, slots, flags):
        return _step(sites, compiled, x, rows, slots, flags)

    # step 1: prompt tokens (flags: prompt token, last prompt token); D's chunk has no last token
    out1 = step(x1, [1, 1, 1, 3, 3, 5, 5, 7, 7], [1, 1, 1, 2, 2, 0, 0, 3, 3],
                [[1, 0], [1, 0], [1, 1], [1, 0], [1, 1], [0, 0], [0, 0], [1, 0], [1, 0]])
    open1 = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.float32)  # A open, B shut, C plain, D undecided
    want1 = reference(toy, x1, table[:, [1] * 3 + [3] * 2 + [5] * 2 + [7] * 2] * open1[None, :, None], None)
    torch.testing.assert_close(out1, want1, rtol=1e-5, atol=1e-5)
    # the gate code of the eager worker, on the same scores, agrees with the planted decisions
    leaf_a, st = gates.parse_gate(la), gates.fresh()
    assert bool(gates.leaf_decision(leaf_a, scores(la, pre1, slice(0, 3)), torch.arange(3), 3, st)[0])
    # step 2: A, B, C generated tokens (decisions held), D's last chunk (decided on the mean of all four)
    out2 = step(x2, [2, 4, 6, 7, 7], [1, 2, 0, 3, 3], [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])
    want2 = reference(toy, x2, table[:, [2, 4, 6, 7, 7]] * torch.tensor([1, 0, 1, 1, 1.0])[None, :, None], None)
    torch.testing.assert_close(out2, want2, rtol=1e-5, atol=1e-5)
    assert sites.gstate[1:4, :, 4].amin() == 1  # every leaf decided
    # thresholds just above the figures shut them: the comparison is live, not always open
    lb1["threshold"], ld["threshold"] = float(b1) + 0.1, float(dm) + 0.1
    adapter._init_slot(sites, 2, parse_spec({"rules": [{"condition": {"kind": "and", "a": lb0, "b": {
        "kind": "not", "of": lb1}}, "vectors": [["v", 1.0]]}]}), {})
    adapter._init_slot(sites, 3, parse_spec({"rules": [{"condition": ld, "vectors": [["v", 1.0]]}]}), {})
    step(torch.cat([x1[3:5], x1[7:9]]), [3, 3, 7, 7], [2, 2, 3, 3], [[1, 0], [1, 1], [1, 0], [1, 0]])
    out3 = step(x2[3:], [7, 7], [3, 3], [[1, 0], [1, 1]])
    torch.testing.assert_close(out3, reference(toy, x2[3:], torch.zeros(LAYERS, 2, D), None), rtol=1e-5, atol=1e-5)
    assert sites.gstate[2, :2, 3].tolist() == [1.0, 0.0]  # B: last@0 open, max@1 now shut, so ~it opens B


def test_a_clamp_in_the_compiled_graph_is_the_eager_clip_where_its_gate_and_positions_allow():
    """Slot 1 clamps layer 1's projection on r̂ to hi (prompt tokens only), slot 2 the same under a gate that stays
    shut, slot 0 tokens are left alone: the compiled output equals the toy run with ``clip_rows`` applied by hand."""
    import steerscope_vllm_adapter as adapter
    import steerscope_vllm_gates as gates
    from steerscope_vllm_spec import parse_spec

    torch.manual_seed(1)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, False, gates=True)
    compiled = torch.compile(toy.model, backend="aot_eager", dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, D, generator=g)
    r = torch.randn(D, generator=g)
    pre = _resid_pre(toy, x)
    hi = float((pre[1] @ (r / r.norm())).median())  # binds on about half the tokens
    vectors = {"cap": {1: r}}
    shut = {"direction": [1.0] * D, "layer": 0, "threshold": 1e9}
    adapter._init_slot(sites, 1, parse_spec({"clamp": {"vector": "cap", "hi": hi, "positions": "prompt"}}), vectors)
    adapter._init_slot(sites, 2, parse_spec({"clamp": {"vector": "cap", "hi": hi, "condition": shut}}), vectors)
    sites.idx.zero_()
    sites.gslot.zero_()
    sites.gslot[:6] = torch.tensor([1, 1, 1, 2, 2, 0])
    sites.gany.fill_(True)
    sites.gtok.zero_()
    sites.gtok[:5] = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0], [1, 1]], dtype=torch.float32)  # token 2: generated
    with torch.no_grad():
        out = compiled(torch.arange(6), x)
        keep = torch.tensor([True, True, False, False, False, False])
        resid, hidden = None, x
        for i, layer in enumerate(toy.model.layers):
            p = hidden if resid is None else hidden + resid
            if i == 1:
                p = gates.clip_rows(p, r / r.norm(), None, hi, keep)
            hidden, resid = layer.mlp(torch.tanh(layer.self_attn(p))), p
        want = hidden + resid
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert int(((pre[1][:2] @ (r / r.norm())) > hi).sum()) >= 1  # the clamp bound somewhere it was allowed to
    # a step without a gated token: the path that skips the gate arithmetic (gany False, as the worker writes it;
    # the operator's early return on CPU) gives what the arithmetic gives (gany True), the unsteered output, and
    # keeps every state
    assert all(layer.steerscope_skip for layer in toy.model.layers)
    sites.gslot.zero_()
    sites.gtok.zero_()
    before, outs = sites.gstate.clone(), []
    for flag in (True, False):
        sites.gany.fill_(flag)
        with torch.no_grad():
            outs.append(compiled(torch.arange(6), x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(sites.gstate, before)
    torch.testing.assert_close(outs[1], reference(toy, x, torch.zeros(LAYERS, 6, D), None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [True, False])  # False: the branch-free graph a CUDA engine traces
@pytest.mark.parametrize("backend", ["aot_eager"])  # inductor: the compiled vLLM engines (test_vllm_parity)
def test_token_conditions_in_the_compiled_graph_equal_the_eager_gate_code_per_token_across_steps(backend, skip):
    """``on="token"`` conditions in the compiled graph decide each token as the eager worker's gate code
    (``leaf_decision`` with its carry, ``gate_open``) does: a running mean over a request's prompt and generated
    tokens (A), a token's own score under a prompt condition (B: ``last`` token leaf ``&`` a prompt leaf), and a
    running max whose prompt is split over two steps (C: a token-only gate never waits for the prompt's end), over
    three steps, with an ungated steered token beside them. Thresholds sit midway between the middle values of each
    running figure, so both decisions occur (asserted). Both ways: with the operator's early return on ungated steps
    (CPU) and branch-free (CUDA)."""
    import steerscope_vllm_adapter as adapter
    import steerscope_vllm_gates as gates
    from steerscope_vllm_spec import parse_spec

    torch.manual_seed(3)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, False, gates=True)
    for layer in toy.model.layers:
        layer.steerscope_skip = skip
    compiled = torch.compile(toy.model, backend=backend, dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(4)
    # per step: (request, number of tokens) in flattened order; request "-" is ungated and plainly steered
    layout = [[("A", 3), ("B", 2), ("C", 2), ("-", 1)], [("A", 1), ("B", 1), ("C", 2), ("-", 1)],
              [("A", 1), ("B", 1), ("C", 1)]]
    plen = {"A": 3, "B": 2, "C": 4}
    xs = [torch.randn(sum(k for _, k in step), D, generator=g) for step in layout]
    pres = [_resid_pre(toy, x) for x in xs]

    def tok(layer, reduce):
        raw = _leaf(g, layer, reduce, 0.0)
        raw["on"] = "token"
        return raw

    la, lb, lbp, lc = tok(1, "mean"), tok(0, "last"), _leaf(g, 1, "mean", -1e9), tok(0, "max")

    def seq(req, raw):  # the leaf's scores of request req's tokens, in order over the steps
        leaf, out = gates.parse_gate(raw), []
        for step, pre in zip(layout, pres):
            at = 0
            for r, k in step:
                if r == req:
                    out.append(gates.score(leaf, pre[leaf.layer][at:at + k]))
                at += k
        return torch.cat(out)

    def mid(v):  # midway between the two middle distinct values: no score sits on the threshold
        u = torch.unique(v)  # sorted
        i = (len(u) - 1) // 2
        return float((u[i] + u[i + 1]) / 2)

    a, b, c = seq("A", la), seq("B", lb), seq("C", lc)
    la["threshold"] = mid(torch.cumsum(a, 0) / torch.arange(1, 6))
    lb["threshold"] = mid(b)
    lc["threshold"] = mid(torch.cummax(c, 0).values)
    rules = {"A": la, "B": {"kind": "and", "a": lb, "b": lbp}, "C": lc}
    specs = {r: parse_spec({"rules": [{"condition": cond, "vectors": [["v", 1.0]]}]}) for r, cond in rules.items()}
    slots = {"A": 1, "B": 2, "C": 3, "-": 0}
    for r, s in specs.items():
        adapter._init_slot(sites, slots[r], s, {})
    vec = torch.randn(D, generator=g)
    table = torch.zeros(LAYERS, sites.rows, D)
    table[2, 1:9] = vec
    sites.table[:LAYERS].copy_(table)  # the toy has no final norm: block LAYERS (its site) stays 0
    states = {r: {id(leaf): gates.fresh() for leaf in gates.spec_leaves(s)} for r, s in specs.items()}
    done = {r: 0 for r in plen}
    opened_all = []
    for step, x, pre in zip(layout, xs, pres):
        rows, slot_tok, flags, want_open = [], [], [], []
        for r, k in step:
            if r == "-":
                rows += [7] * k
                slot_tok += [0] * k
                flags += [[0, 0]] * k
                want_open += [1.0] * k
                continue
            pos = torch.arange(done[r], done[r] + k)
            rows += [1 + 2 * (slots[r] - 1) + int(p >= plen[r]) for p in pos]  # prompt / generated row of the request
            slot_tok += [slots[r]] * k
            flags += [[float(p < plen[r]), float(p == plen[r] - 1)] for p in pos]
            at = sum(kk for rr, kk in step[: [q for q, _ in step].index(r)])
            values, undecided = {}, False
            for leaf in gates.spec_leaves(specs[r]):
                got = gates.leaf_decision(leaf, gates.score(leaf, pre[leaf.layer][at:at + k]), pos, plen[r],
                                          states[r][id(leaf)])
                undecided |= got is None
                if got is not None:
                    values[id(leaf)] = got
            o = torch.zeros(k) if undecided else gates.gate_open(specs[r].rules[0][0], values, k).float()
            want_open += o.tolist()
            opened_all += [(r, v) for v in o.tolist()]
            done[r] += k
        out = _step(sites, compiled, x, rows, slot_tok, flags)
        want = reference(toy, x, table[:, rows] * torch.tensor(want_open)[None, :, None], None)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for r in "ABC":  # each gated request had open and shut tokens: the per-token comparison is live
        assert {v for q, v in opened_all if q == r} == {0.0, 1.0}, r


@pytest.mark.parametrize("skip", [True, False])  # False: the branch-free graph a CUDA engine traces
def test_rules_in_the_compiled_graph_take_the_first_open_rule_as_the_eager_gate_code(skip):
    """Several rules per request in the compiled graph (first match wins): each token gets the delta of the first
    rule whose gate is open, as the eager worker's ``rule_weights`` says from ``leaf_decision`` on the same scores.
    A: its first rule opens; B: its second (a different vector, from the slot's ``gxtab``); C: a per-token
    condition picks its second rule on some prompt tokens and its ``else`` on the others, and its generated token
    is not steered (positions "prompt"); D: no rule opens (unsteered); E: ungated, plainly steered. Two steps (the
    prompts, then one generated token each), vectors at two layers."""
    import steerscope_vllm_adapter as adapter
    import steerscope_vllm_gates as gates
    from steerscope_vllm_spec import parse_spec

    torch.manual_seed(5)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=6),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, False, gates=True)
    for layer in toy.model.layers:
        layer.steerscope_skip = skip
    compiled = torch.compile(toy.model, backend="aot_eager", dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(6)
    vectors = {"v1": {1: torch.randn(D, generator=g), 2: torch.randn(D, generator=g)},
               "v2": {2: torch.randn(D, generator=g)}, "v3": {1: torch.randn(D, generator=g)}}
    layout = [[("A", 3), ("B", 2), ("C", 3), ("D", 2), ("E", 2)], [("A", 1), ("B", 1), ("C", 1), ("D", 1), ("E", 1)]]
    plen = {"A": 3, "B": 2, "C": 3, "D": 2, "E": 2}
    xs = [torch.randn(sum(k for _, k in step), D, generator=g) for step in layout]
    pres = [_resid_pre(toy, x) for x in xs]

    def prompt_mean(raw, req):  # the leaf's mean score over request req's prompt (step 1)
        leaf, at = gates.parse_gate(raw), sum(k for r, k in layout[0][: [q for q, _ in layout[0]].index(req)])
        return float(gates.score(leaf, pres[0][leaf.layer][at:at + plen[req]]).mean())

    def opened(req, up):  # a mean-reduce prompt leaf at layer 0, open (up) or shut on request req
        raw = _leaf(g, 0, "mean", 0.0)
        raw["threshold"] = prompt_mean(raw, req) + (-0.1 if up else 0.1)
        return raw

    ctok = _leaf(g, 0, "last", 0.0)
    ctok["on"] = "token"
    c_scores = gates.score(gates.parse_gate(ctok), pres[0][0][5:8])
    ctok["threshold"] = float(c_scores.sort().values[:2].mean())  # between C's two lowest prompt scores
    raw = {"A": {"rules": [{"condition": opened("A", True), "vectors": [["v1", 1.0]]},
                           {"condition": None, "vectors": [["v2", 2.0]]}]},
           "B": {"rules": [{"condition": opened("B", False), "vectors": [["v1", 1.0]]},
                           {"condition": opened("B", True), "vectors": [["v2", -1.5], ["v3", 0.5]]},
                           {"condition": None, "vectors": [["v3", 1.0]]}]},
           "C": {"rules": [{"condition": opened("C", False), "vectors": [["v1", 1.0]]},
                           {"condition": ctok, "vectors": [["v2", 1.0]]},
                           {"condition": None, "vectors": [["v3", 0.7]]}], "positions": "prompt"},
           "D": {"rules": [{"condition": {"kind": "not", "of": opened("D", True)}, "vectors": [["v1", 1.0]]},
                           {"condition": opened("D", False), "vectors": [["v2", 1.0]]}]}}
    specs = {r: parse_spec(s) for r, s in raw.items()}
    slots = {"A": 1, "B": 2, "C": 3, "D": 4, "E": 0}
    for r, s in specs.items():
        adapter._init_slot(sites, slots[r], s, vectors)

    def delta(pairs):  # [layers d]: sum of alpha * v per layer, as the worker sums it
        out = torch.zeros(LAYERS, D)
        for name, alpha in pairs:
            for layer, v in vectors[name].items():
                out[layer] += alpha * v
        return out

    order = list(plen)  # request i's rows in table: 1 + 2i (prompt), 2 + 2i (generated), as the worker writes them
    table = torch.zeros(LAYERS, sites.rows, D)
    for i, r in enumerate(order):
        first = delta([["v1", 1.0]]) if r == "E" else delta(specs[r].rules[0][1])
        pos = "all" if r == "E" else specs[r].positions
        table[:, 1 + 2 * i] = first if pos in ("all", "prompt") else 0
        table[:, 2 + 2 * i] = first if pos in ("all", "generated") else 0
    sites.table[:LAYERS].copy_(table)  # the toy has no final norm: block LAYERS (its site) stays 0
    states = {r: {id(leaf): gates.fresh() for leaf in gates.spec_leaves(s)} for r, s in specs.items()}
    done = {r: 0 for r in plen}
    won = {r: set() for r in specs}
    for step, x, pre in zip(layout, xs, pres):
        rows, slot_tok, flags, want = [], [], [], []
        at = 0
        for r, k in step:
            i, pos = order.index(r), torch.arange(done[r], done[r] + k)
            rows += [1 + 2 * i + int(p >= plen[r]) for p in pos]
            slot_tok += [slots[r]] * k
            flags += [[float(p < plen[r]), float(p == plen[r] - 1)] for p in pos] if r != "E" else [[0, 0]] * k
            if r == "E":
                want += [delta([["v1", 1.0]])] * k
            else:
                values = {}
                for leaf in gates.spec_leaves(specs[r]):
                    got = gates.leaf_decision(leaf, gates.score(leaf, pre[leaf.layer][at:at + k]), pos, plen[r],
                                              states[r][id(leaf)])
                    assert got is not None  # every prompt is whole in step 1
                    values[id(leaf)] = got
                weights = gates.rule_weights([c for c, _ in specs[r].rules], values, k)
                keep = gates.position_keep(specs[r].positions, pos, plen[r]).float()
                for t in range(k):
                    d = torch.zeros(LAYERS, D)
                    for j, (w, (_, pairs)) in enumerate(zip(weights, specs[r].rules)):
                        if w[t] * keep[t] > 0:
                            d = delta(pairs)
                            won[r].add(j)
                    want.append(d)
            done[r] += k
            at += k
        out = _step(sites, compiled, x, rows, slot_tok, flags)
        torch.testing.assert_close(out, reference(toy, x, torch.stack(want, 1), None), rtol=1e-5, atol=1e-5)
    assert won == {"A": {0}, "B": {1}, "C": {1, 2}, "D": set()}  # each rule position acted somewhere it should


def test_the_cpu_operator_recomputes_its_gates_every_step_even_when_the_token_count_repeats():
    """On CPU the operator works out a step's gates at its first layer and reuses them above it (recomputing where a
    leaf is read). Two decode steps of the same size with the requests in swapped order must each get their own
    gates: the leaf is read at layer 1 only, so layer 0's gates come from the held decisions (A open, B shut), and a
    gate carried over from the step before would steer B's token at layer 0. Compared with the eager toy run."""
    import steerscope_vllm_adapter as adapter
    import steerscope_vllm_gates as gates
    from steerscope_vllm_spec import parse_spec

    torch.manual_seed(7)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, False, gates=True)
    assert all(layer.steerscope_skip for layer in toy.model.layers) and sites.gfirst == 0
    compiled = torch.compile(toy.model, backend="aot_eager", dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(8)
    x1 = torch.randn(4, D, generator=g)  # step 1: A's prompt (tokens 0-1), B's prompt (2-3)
    pre1 = _resid_pre(toy, x1)
    leaf = _leaf(g, 1, "mean", 0.0)
    s = gates.score(gates.parse_gate(leaf), pre1[1])
    sa, sb = float(s[:2].mean()), float(s[2:].mean())
    if sa < sb:  # A's prompt scores higher: its gate opens, B's stays shut
        x1 = torch.cat([x1[2:], x1[:2]])
        pre1, (sa, sb) = _resid_pre(toy, x1), (sb, sa)
    leaf["threshold"] = (sa + sb) / 2
    spec = parse_spec({"rules": [{"condition": leaf, "vectors": [["v", 1.0]]}]})
    adapter._init_slot(sites, 1, spec, {})
    adapter._init_slot(sites, 2, spec, {})
    vec = torch.randn(D, generator=g) * 3
    table = torch.zeros(LAYERS, sites.rows, D)
    table[0, 1:5] = vec  # below the leaf: steered from the held decision only
    table[2, 1:5] = -vec
    sites.table[:LAYERS].copy_(table)  # the toy has no final norm: block LAYERS (its site) stays 0
    out = _step(sites, compiled, x1, [1, 1, 3, 3], [1, 1, 2, 2], [[1, 0], [1, 1], [1, 0], [1, 1]])
    want = table[:, [1, 1, 3, 3]].clone()
    want[0] = 0  # the prefill: layer 0 runs before the leaf decides
    want[:, 2:] = 0  # B shut
    torch.testing.assert_close(out, reference(toy, x1, want, None), rtol=1e-5, atol=1e-5)
    for order in ([(2, 1), (4, 2)], [(4, 2), (2, 1)]):  # (row, slot) per token: A then B, then B then A
        x = torch.randn(2, D, generator=g)
        rows, slots = [r for r, _ in order], [q for _, q in order]
        out = _step(sites, compiled, x, rows, slots, [[0, 0], [0, 0]])
        want = table[:, rows] * torch.tensor([float(q == 1) for q in slots])[None, :, None]
        torch.testing.assert_close(out, reference(toy, x, want, None), rtol=1e-5, atol=1e-5)


class Norm(torch.nn.Module):
    """vLLM's fused add + norm, called as ``norm(hidden, residual)`` (here the norm is a scaling by 2)."""

    def forward(self, hidden, residual=None):
        s = hidden if residual is None else hidden + residual
        return 2.0 * s, s


class NormedInner(Inner):
    def __init__(self) -> None:
        super().__init__()
        self.norm = Norm()

    def forward(self, positions, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        out, _ = self.norm(hidden, residual)
        return out


def test_the_final_norms_site_adds_its_table_block_to_the_stream_leaving_the_last_block_in_the_compiled_graph():
    """table[LAYERS] (the engine's "layer n_layers", where mlp_out of the last block lands) is added by a pre-hook
    on the final norm, traced into the graph; rows 0 (unsteered tokens) add nothing."""
    torch.manual_seed(0)
    toy = Toy().eval()
    toy.model = NormedInner().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, False)
    assert sites.table.shape[0] == LAYERS + 1
    compiled = torch.compile(toy.model, backend="aot_eager", dynamic=True, fullgraph=True)
    x, pos = torch.randn(6, D), torch.arange(6)
    with torch.no_grad():
        first = compiled(pos, x)  # traced with every buffer zero
    torch.testing.assert_close(first, 2.0 * reference(toy, x, torch.zeros(LAYERS, 6, D), None), rtol=0, atol=0)
    rows = torch.tensor([1, 1, 2, 0, 0, 3])
    final = torch.randn(sites.rows, D)
    final[0] = 0
    sites.table[LAYERS].copy_(final)
    sites.idx.zero_()
    sites.idx[:6] = rows
    with torch.no_grad():
        out = compiled(pos, x)
    want = 2.0 * (reference(toy, x, torch.zeros(LAYERS, 6, D), None) + final[rows])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, first)
