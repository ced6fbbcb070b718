"""EAP-IG against exact computations on a tiny random Llama (GQA)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

import steerscope as ss
from steerscope import circuits as A
from steerscope import circuits as C
from steerscope.errors import SteerscopeError
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(one_thread):
    lm = tiny_lm(layers=3)
    v = tiny_vector(lm, layer=1, scale=2.0)
    pb = A.prepare(lm, PROMPTS[:3], v, 1.0, max_new_tokens=6)
    att = A.eap_ig(lm, pb, v, 1.0, steps=10, batch_size=3)
    return lm, v, pb, att


def test_prepare_masks_agreeing_positions_and_prompt(setup) -> None:
    lm, v, pb, _ = setup
    assert pb.mask.any()
    assert (pb.y_steer[pb.mask] != pb.y_base[pb.mask]).all()
    P = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:3]])["input_ids"].shape[1]
    assert not pb.mask[:, : P - 1].any()


def test_receiver_gradients_sum_to_the_total_gradient(setup) -> None:
    lm, v, pb, att = setup
    gr, m = A.receiver_grads(lm, pb, v, 0.5, att.graph)
    store = {}

    def leaf(x, _c):
        store["x"] = x.detach().requires_grad_(True)
        return store["x"]
    with ss.steering(lm, v, 0.5), ss.attached(lm, {"blocks.1.resid_pre": leaf}):
        m2 = A.metric(A.forward(lm, pb), pb)
    (g,) = torch.autograd.grad(m2.sum(), store["x"])
    assert torch.allclose(m, m2.detach(), atol=1e-5)
    assert torch.allclose(gr.sum(2), g, atol=1e-5 * g.abs().max().item() + 1e-7)


def test_steering_node_score_matches_integrated_gradient_completeness(setup) -> None:
    _, _, _, att = setup
    # IG completeness: the steering node's score ≈ m(clean) - m(corrupt) (midpoint rule, T=10)
    assert att.nodes[0].item() == pytest.approx(att.m_clean - att.m_corrupt, rel=0.05)
    assert att.ie_vec.sum().item() == pytest.approx(att.nodes[0].item(), rel=1e-4)


def test_node_scores_rank_correlate_with_exact_activation_patching(setup) -> None:
    lm, v, pb, att = setup
    exact = C.node_patching(lm, pb, v, 1.0, att.graph)
    top = att.nodes[1:].abs().argsort(descending=True)[:8] + 1
    rho = spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic
    assert rho >= 0.8, rho


def test_edge_scores_match_single_edge_patching_on_the_top_edges(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    flat = att.edges.abs().flatten().argsort(descending=True)[:6]
    full = torch.ones_like(g.valid)
    m0 = C.patched_metric(lm, pb, v, 1.0, g, full).mean()
    ex, est = [], []
    for f in flat.tolist():
        keep = full.clone().flatten()
        keep[f] = False
        ex.append(float(m0 - C.patched_metric(lm, pb, v, 1.0, g, keep.view_as(full)).mean()))
        est.append(float(att.edges.flatten()[f]))
    assert all((a > 0) == (b > 0) for a, b in zip(ex, est) if abs(a) > 0.1 * max(map(abs, ex)))
    assert spearmanr(ex, est).statistic >= 0.6


def test_eap_ig_equals_the_step_by_step_computation_on_full_forwards(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    clean, corr = A.node_values(lm, pb, v, 1.0), A.node_values(lm, pb, v, 0.0)
    gbar = sum(A.receiver_grads(lm, pb, v, (k + 0.5) / 10, g)[0] for k in range(10)) / 10
    edges = torch.einsum("bpud,bpvd->uv", (clean - corr).double(), gbar.double()) / pb.ids.shape[0]
    edges = torch.where(g.valid, edges, torch.zeros_like(edges)).float()
    assert torch.allclose(att.edges, edges, atol=1e-5 * edges.abs().max().item())


def test_eap_ig_is_the_same_however_steps_and_samples_are_batched(setup) -> None:
    lm, v, pb, att = setup
    other = A.eap_ig(lm, pb, v, 1.0, steps=10, batch_size=2, pass_budget=1)  # one step per forward/backward
    scale = att.edges.abs().max().item()
    assert torch.allclose(other.edges, att.edges, atol=1e-5 * scale)
    assert torch.allclose(other.ie_vec, att.ie_vec, atol=1e-5 * att.ie_vec.abs().max().item())
    assert other.m_clean == pytest.approx(att.m_clean, abs=1e-5)
    assert other.m_corrupt == pytest.approx(att.m_corrupt, abs=1e-5)


def test_unsupported_vector_shape_raises(setup) -> None:
    lm, v, pb, _ = setup
    two = ss.SteeringVector({0: v[1], 1: v[1]})
    with pytest.raises(SteerscopeError):
        A.eap_ig(lm, pb, two, 1.0)


def test_per_sample_steering_node_edges_average_to_the_steering_row_and_match_single_sample_runs(setup) -> None:
    lm, v, pb, att = setup
    torch.testing.assert_close(att.s_edges.mean(0).float(), att.edges[0], rtol=1e-4, atol=1e-5)
    for i in range(pb.ids.shape[0]):  # each sample's row is that sample attributed alone
        alone = A.eap_ig(lm, pb.rows(slice(i, i + 1)), v, 1.0, steps=10, batch_size=1)
        torch.testing.assert_close(att.s_edges[i].float(), alone.edges[0], rtol=1e-3, atol=1e-4)


def test_patched_metrics_per_prompt_average_to_the_faithfulness(setup) -> None:
    lm, v, pb, att = setup
    circ = A.greedy_circuit(att.edges, att.graph, 20)
    m = A.patched_per_prompt(lm, pb, v, 1.0, att.graph, [circ], batch_size=2)
    (f,), mf, me = A.faithfulness_of(lm, pb, v, 1.0, att.graph, [circ])
    assert m.shape == (3, pb.ids.shape[0])
    assert float(m[0].mean()) == pytest.approx(mf) and float(m[1].mean()) == pytest.approx(me)
    assert float((m[2].mean() - m[1].mean()) / (m[0].mean() - m[1].mean())) == pytest.approx(f)


def test_mean_gradient_by_autograd_equals_eap_igs_mean_grad(setup) -> None:
    lm, v, pb, att = setup
    got = A.mean_gradient(lm, pb, v, 1.0, steps=10, batch_size=2)
    assert torch.allclose(got, att.mean_grad, rtol=1e-4, atol=1e-5 * float(att.mean_grad.abs().max()))
    neg = A.eap_ig(lm, A.prepare(lm, PROMPTS[:2], v, -1.0, max_new_tokens=6), v, -1.0, steps=4, batch_size=2)
    got_neg = A.mean_gradient(lm, A.prepare(lm, PROMPTS[:2], v, -1.0, max_new_tokens=6), v, -1.0, steps=4)
    assert torch.allclose(got_neg, neg.mean_grad, rtol=1e-4, atol=1e-5 * float(neg.mean_grad.abs().max()))
