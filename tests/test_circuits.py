"""Edge-level patching, circuit pruning, faithfulness and overlap on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from steerscope import circuits as A
from steerscope import circuits as C
from steerscope.circuits import Node, Receiver
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread):
    lm = tiny_lm(layers=3)
    v = tiny_vector(lm, layer=1, scale=2.0)
    pb = A.prepare(lm, PROMPTS[:2], v, 1.0, max_new_tokens=5)
    g = A.Graph.build(1, lm.n_layers, lm.n_heads, lm.n_kv_heads)
    return lm, v, pb, g


def test_all_edges_give_the_steered_run_and_none_the_unsteered_run(setup) -> None:
    lm, v, pb, g = setup
    with torch.no_grad(), ss.steering(lm, v, 1.0):
        m_steer = A.metric(A.forward(lm, pb), pb)
    with torch.no_grad():
        m_base = A.metric(A.forward(lm, pb), pb)
    full, empty = torch.ones_like(g.valid), torch.zeros_like(g.valid)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, full), m_steer, atol=1e-4)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, empty), m_base, atol=1e-3)


def test_dropping_every_edge_out_of_a_head_equals_patching_its_output(setup) -> None:
    lm, v, pb, g = setup
    u = g.index(Node.attn_head(2, 1))
    keep = torch.ones_like(g.valid)
    keep[u] = False
    corr = {}
    with torch.no_grad(), ss.recording(lm, ["blocks.2.attn.z"]) as cache:
        A.forward(lm, pb)

    def patch(x, _c):
        x = x.clone()
        x[:, :, 1] = cache["blocks.2.attn.z"][:, :, 1]
        return x
    with torch.no_grad(), ss.steering(lm, v, 1.0), ss.attached(lm, {"blocks.2.attn.z": patch}):
        ref = A.metric(A.forward(lm, pb), pb)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, keep), ref, atol=1e-4)
    del corr


def test_prune_keeps_only_paths_from_s_to_logits() -> None:
    g = A.Graph.build(0, 2, 2, 1)
    keep = torch.zeros_like(g.valid)
    R = g.receiver_index
    keep[0, R(Receiver(0, "q", 0))] = True  # s -> head L0.H0
    keep[g.index(Node.attn_head(0, 0)), R(Receiver(2, "logits"))] = True  # L0.H0 -> logits: a full path
    keep[g.index(Node.attn_head(1, 1)), R(Receiver(2, "logits"))] = True  # dangling: L1.H1 has no input from s
    keep[0, R(Receiver(1, "mlp"))] = True  # dangling: L1.MLP does not reach the logits
    out = C.prune(keep, g)
    assert int(out.sum()) == 2
    assert out[0, R(Receiver(0, "q", 0))] and out[g.index(Node.attn_head(0, 0)), R(Receiver(2, "logits"))]


def test_overlap_and_random_circuit_sizes() -> None:
    g = A.Graph.build(0, 2, 2, 1)
    a = C.random_circuit(g, 10, seed=0)
    b = C.random_circuit(g, 20, seed=1)
    assert int(a.sum()) == 10 and not (a & ~g.valid).any()
    assert C.overlap(a, a | b) == 1.0
    assert 0.0 <= C.overlap(a, b) <= 1.0


def test_faithfulness_is_one_for_the_full_graph(setup) -> None:
    lm, v, pb, g = setup
    vals, mf, me = C.faithfulness_of(lm, pb, v, 1.0, g, [g.valid.clone(), torch.zeros_like(g.valid)])
    assert vals[0] == pytest.approx(1.0, abs=1e-4) and vals[1] == pytest.approx(0.0, abs=1e-4)
    assert mf != me
