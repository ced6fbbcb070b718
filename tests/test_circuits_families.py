"""EAP-IG, exact patching and circuits on GPT-2 (fused Conv1D qkv, LayerNorm) and GPT-NeoX (fused
per-head qkv, parallel residual), tiny random models, against autograd and exact patching."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

import steerscope as ss
from conftest import make_tiny
from steerscope import circuits as C
from steerscope.circuits import Node, Receiver
from steerscope.errors import UnsupportedModelError
from test_refusal_mechanisms_fixtures import PROMPTS, autograd_resid_grad, one_thread, smol_tokenizer, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def setup(request, one_thread):
    lm = make_tiny(request.param, tokenizer=smol_tokenizer())
    with torch.no_grad():  # weights large enough that the heads and MLPs matter against the norms
        for name, p in lm.model.named_parameters():
            if "ln" not in name and "norm" not in name:
                p.mul_(10.0)
    v = tiny_vector(lm, layer=1, scale=1.0)
    pb = C.prepare(lm, PROMPTS[:3], v, 1.0, max_new_tokens=6)
    att = C.eap_ig(lm, pb, v, 1.0, steps=10, batch_size=3)
    return lm, v, pb, att


def test_a_parallel_residual_mlp_is_not_fed_by_its_own_blocks_heads(setup) -> None:
    lm, _, _, att = setup
    g = att.graph
    assert g.parallel == bool(lm.family.parallel_residual)
    own = g.valid[g.index(Node.attn_head(1, 0)), g.receiver_index(Receiver(1, "mlp"))]
    assert bool(own) != g.parallel
    assert g.valid[g.index(Node.attn_head(1, 0)), g.receiver_index(Receiver(2, "mlp"))]


def test_receiver_gradients_sum_to_the_autograd_total(setup) -> None:
    lm, v, pb, att = setup
    gr, m = C.receiver_grads(lm, pb, v, 0.5, att.graph)
    m2, g = autograd_resid_grad(lm, pb, v, 0.5, layer=1)
    assert torch.allclose(m, m2.detach(), atol=1e-4)
    assert torch.allclose(gr.sum(2), g, atol=1e-5 * g.abs().max().item() + 1e-7)
    assert att.nodes[0].item() == pytest.approx(att.m_clean - att.m_corrupt, rel=0.05)


def test_all_edges_give_the_steered_run_and_none_the_unsteered_run(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    with torch.no_grad(), ss.steering(lm, v, 1.0):
        m_steer = C.metric(C.forward(lm, pb), pb)
    with torch.no_grad():
        m_base = C.metric(C.forward(lm, pb), pb)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, torch.ones_like(g.valid)), m_steer, atol=1e-4)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, torch.zeros_like(g.valid)), m_base, atol=1e-3)


def test_node_scores_rank_correlate_with_exact_node_patching(setup) -> None:
    lm, v, pb, att = setup
    exact = C.node_patching(lm, pb, v, 1.0, att.graph)
    top = att.nodes[1:].abs().argsort(descending=True)[:8] + 1
    assert spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic >= 0.8


def test_batched_edge_patching_equals_unbatched_patched_metric(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    R, up, H = g.receiver_index, g.index, Node.attn_head
    picks = [(up(Node.steer(1)), R(Receiver(2, "k", 1))), (up(H(1, 2)), R(Receiver(2, "v", 0))),
             (up(Node.mlp(1)), R(Receiver(2, "q", 3))), (up(H(2, 0)), R(Receiver(4, "logits"))),
             (up(Node.mlp(2)), R(Receiver(3, "mlp")))]
    want = torch.zeros_like(g.valid)
    for u, r in picks:
        want[u, r] = True
    ex = C.edge_effects(lm, pb, v, 1.0, g, edges=want, batch_size=2, tokens_per_pass=64)
    full = torch.ones_like(g.valid)
    m0 = C.patched_metric(lm, pb, v, 1.0, g, full)
    for u, r in picks:
        keep = full.clone()
        keep[u, r] = False
        ref = float((m0 - C.patched_metric(lm, pb, v, 1.0, g, keep)).mean())
        assert ex[u, r].item() == pytest.approx(ref, abs=1e-4 + 1e-4 * abs(ref)), (g.upstream[u], g.receivers[r])
    assert any(abs(ex[u, r].item()) > 1e-2 for u, r in picks)


def test_scaled_logits_are_refused_naming_what_is_missing() -> None:
    lm = make_tiny("llama")
    lm.model.config.logit_scale = 0.5
    with pytest.raises(UnsupportedModelError, match="logit_scale"):
        C.check_supported(lm)
