"""Batched exact edge / node patching against the unbatched edge-level patching, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from steerscope import circuits as A
from steerscope import circuits as C
from steerscope.circuits import Node, Receiver
from steerscope.circuits import exact as E
from steerscope.errors import SteerscopeError
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread):
    lm = tiny_lm(layers=3)
    v = tiny_vector(lm, layer=1, scale=2.0)
    pb = A.prepare(lm, PROMPTS[:3], v, 1.0, max_new_tokens=6)
    g = A.Graph.build(1, lm.n_layers, lm.n_heads, lm.n_kv_heads)
    return lm, v, pb, g


def _unbatched_edge(lm, v, pb, g, f: int) -> float:
    full = torch.ones_like(g.valid)
    keep = full.clone().flatten()
    keep[f] = False
    m0 = C.patched_metric(lm, pb, v, 1.0, g, full)
    return float((m0 - C.patched_metric(lm, pb, v, 1.0, g, keep.view_as(full))).mean())


def test_batched_single_edge_patching_equals_unbatched_patched_metric(setup) -> None:
    lm, v, pb, g = setup
    U, V = g.valid.shape
    R, up, H = g.receiver_index, g.index, Node.attn_head
    s, logits = Node.steer(1), Receiver(3, "logits")
    picks = [(up(s), R(Receiver(1, "q", 0))), (up(s), R(Receiver(2, "k", 1))), (up(H(1, 2)), R(Receiver(2, "v", 0))),
             (up(Node.mlp(1)), R(Receiver(2, "q", 3))), (up(H(1, 1)), R(Receiver(1, "mlp"))),
             (up(s), R(Receiver(2, "mlp"))), (up(H(2, 0)), R(logits)), (up(Node.mlp(2)), R(logits)),
             (up(H(1, 3)), R(Receiver(2, "v", 1)))]
    want = torch.zeros_like(g.valid)
    for u, r in picks:
        want[u, r] = True
    # a small pass size: rows of different layers share passes, and one edge spans several passes
    ex = E.edge_effects(lm, pb, v, 1.0, g, edges=want, batch_size=2, tokens_per_pass=64)
    assert (ex[~want] == 0).all()
    for u, r in picks:
        ref = _unbatched_edge(lm, v, pb, g, u * V + r)
        assert ex[u, r].item() == pytest.approx(ref, abs=1e-4 + 1e-4 * abs(ref)), (g.upstream[u], g.receivers[r])
    assert any(abs(ex[u, r].item()) > 1e-2 for u, r in picks)  # the check is not vacuous


def test_batched_node_patching_equals_dropping_all_outgoing_edges(setup) -> None:
    lm, v, pb, g = setup
    nodes = [g.index(n) for n in (Node.steer(1), Node.attn_head(1, 1), Node.mlp(1), Node.attn_head(2, 3), Node.mlp(2))]
    ex = E.node_effects(lm, pb, v, 1.0, g, nodes=nodes, tokens_per_pass=100)
    full = torch.ones_like(g.valid)
    m0 = C.patched_metric(lm, pb, v, 1.0, g, full).mean()
    for j, u in enumerate(nodes):
        keep = full.clone()
        keep[u] = False
        ref = float(m0 - C.patched_metric(lm, pb, v, 1.0, g, keep).mean())
        assert ex[j].item() == pytest.approx(ref, abs=1e-4 + 1e-4 * abs(ref)), g.upstream[u]
    with torch.no_grad(), ss.steering(lm, v, 1.0):
        m_steer = A.metric(A.forward(lm, pb), pb).mean().item()
    with torch.no_grad():
        m_base = A.metric(A.forward(lm, pb), pb).mean().item()
    assert ex[0].item() == pytest.approx(m_steer - m_base, abs=1e-4)  # dropping s = the unsteered run


def test_every_edge_in_one_call_matches_single_calls(setup) -> None:
    lm, v, pb, g = setup
    every = E.edge_effects(lm, pb, v, 1.0, g)
    assert int((every != 0).sum()) > 0.9 * g.n_edges and (every[~g.valid] == 0).all()
    some = g.valid & (torch.rand(g.valid.shape, generator=torch.Generator().manual_seed(0)) < 0.1)
    part = E.edge_effects(lm, pb, v, 1.0, g, edges=some, tokens_per_pass=300)
    assert torch.allclose(every[some], part[some], atol=1e-5)


def test_receiver_and_node_sites_cover_the_graph() -> None:
    g = A.Graph.build(1, 3, 4, 2)
    sites = [E.receiver_site(g, j) for j in range(len(g.receivers))]
    assert sites[g.receiver_index(Receiver(1, "q", 2))] == (1, E.POINTS.index("q"), 2)
    assert sites[g.receiver_index(Receiver(2, "v", 1))] == (2, E.POINTS.index("v"), 1)
    assert sites[g.receiver_index(Receiver(2, "mlp"))] == (2, E.POINTS.index("mlp"), 0)
    assert sites[-1] == (3, E.POINTS.index("pre"), 0)
    assert E.node_site(g, 0) == (1, E.POINTS.index("pre"))
    assert E.node_site(g, g.index(Node.attn_head(2, 3))) == (2, E.POINTS.index("mid"))
    assert E.node_site(g, g.index(Node.mlp(2))) == (3, E.POINTS.index("pre"))


def test_a_graph_from_another_layer_is_refused(setup) -> None:
    lm, v, pb, _ = setup
    with pytest.raises(SteerscopeError):
        E.edge_effects(lm, pb, v, 1.0, A.Graph.build(0, lm.n_layers, lm.n_heads, lm.n_kv_heads))
