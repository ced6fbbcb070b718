"""Extraction against independent computations on output_hidden_states, numpy and steering-vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.errors import DataError
from steerscope.extract import aggregate

POS = ["Write a formal letter to the board.", "Compose a formal invitation to the gala.",
       "Draft an official statement about the merger.", "Write a professional email to a client."]
NEG = ["write a chill text to my bro", "yo send a casual msg to my pal lol",
       "just a quick note to a friend, nothing fancy", "hey whats up wanna hang"]


@pytest.fixture(scope="module")
def lm(smol_tokenizer):
    return make_tiny("llama", seed=4, tokenizer=smol_tokenizer)


def _hidden_by_hand(lm, texts, layer, pos):
    """Independent path: one text at a time, no padding, output_hidden_states."""
    rows = []
    for t in texts:
        enc = lm.tokenizer(t, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hs = lm.model(**enc, output_hidden_states=True).hidden_states[layer][0]
        rows.append(hs[pos].mean(0))
    return torch.stack(rows)


def test_dim_equals_plain_torch_on_output_hidden_states(lm):
    vec = ss.extract(lm, POS, NEG, method="dim", layers=[1, 3], positions=[-1, -2])
    for layer in (1, 3):
        p = _hidden_by_hand(lm, [lm.format_chat(x) for x in POS], layer, [-1, -2])
        n = _hidden_by_hand(lm, [lm.format_chat(x) for x in NEG], layer, [-1, -2])
        torch.testing.assert_close(vec[layer], p.mean(0) - n.mean(0), rtol=1e-4, atol=1e-4)
    assert vec.provenance.method == "dim" and vec.provenance.fingerprint == lm.fingerprint


def test_batched_equals_unbatched(lm):
    a = ss.extract(lm, POS, NEG, layers=[2], batch_size=8)
    b = ss.extract(lm, POS, NEG, layers=[2], batch_size=1)
    torch.testing.assert_close(a[2], b[2], rtol=1e-4, atol=1e-4)


def test_pairs_read_the_answer_token(lm):
    pos = [(q, "(A") for q in POS]
    neg = [(q, "(B") for q in POS]
    vec = ss.extract(lm, pos, neg, method="caa", layers=[2], positions=[-1])
    p = _hidden_by_hand(lm, [lm.format_chat(q, None, "(A") for q in POS], 2, [-1])
    n = _hidden_by_hand(lm, [lm.format_chat(q, None, "(B") for q in POS], 2, [-1])
    torch.testing.assert_close(vec[2], (p - n).mean(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="pairs"):
        ss.extract(lm, POS, NEG, method="caa", layers=[2])


def test_aggregators_against_numpy():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(20, 8)) + np.array([2.0] + [0.0] * 7)
    neg = rng.normal(size=(20, 8))
    tp, tn = torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32)
    np.testing.assert_allclose(aggregate.diff_in_means(tp, tn), pos.mean(0) - neg.mean(0), rtol=1e-5, atol=1e-5)
    d = pos - neg
    u = np.linalg.svd(d, full_matrices=False)[2][0]
    got = aggregate.pca_diff(tp, tn).numpy()
    cos = abs(got @ u) / np.linalg.norm(got)
    assert cos > 0.9999
    assert got @ (pos.mean(0) - neg.mean(0)) > 0  # oriented towards positives
    probe = aggregate.logistic_probe(tp, tn).numpy()
    assert probe[0] / np.linalg.norm(probe) > 0.7  # the informative dimension dominates
    with pytest.raises(DataError, match="exactly one"):
        aggregate.actadd(tp, tn)


def test_every_method_runs_and_points_the_same_way(lm):
    base = ss.extract(lm, POS, NEG, method="dim", layers=[2])
    for m in ("pca", "pca_center", "probe"):
        v = ss.extract(lm, POS, NEG, method=m, layers=[2])
        assert v[2].shape == (lm.d_model,)
        assert v.cosine(base)[2] > 0
    act = ss.extract(lm, POS[:1], NEG[:1], method="actadd", layers=[2])
    assert act[2].norm() > 0


def test_bad_extraction_inputs(lm):
    with pytest.raises(DataError, match="unknown method"):
        ss.extract(lm, POS, NEG, method="magic")
    with pytest.raises(ss.SteerscopeError, match="out of range"):
        ss.extract(lm, POS, NEG, layers=[40])
    with pytest.raises(DataError, match="outside"):
        ss.extract(lm, POS, NEG, layers=[1], positions=[-500])


def test_matches_steering_vectors_mean_aggregator(lm):
    sv = pytest.importorskip("steering_vectors")
    pairs = [(lm.format_chat(p), lm.format_chat(n)) for p, n in zip(POS, NEG)]
    theirs = sv.train_steering_vector(lm.model, lm.tokenizer, pairs, layers=[2], read_token_index=-1,
                                      show_progress=False)
    ours = ss.extract(lm, POS, NEG, method="dim", layers=[2], positions=[-1])
    # steering-vectors reads the output of layer 2 (= our resid_pre of layer 3)
    ours3 = ss.extract(lm, POS, NEG, method="dim", layers=[3], positions=[-1])
    t = theirs.layer_activations[2].float()
    cos = torch.nn.functional.cosine_similarity(t, ours3[3], dim=0)
    assert cos >= 0.9999, float(cos)
    assert ours[2].shape == t.shape


def test_forward_pass_stops_after_deepest_needed_layer(lm):
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(lm.blocks)]
    try:
        ss.extract(lm, POS[:2], NEG[:2], layers=[1], batch_size=4)
    finally:
        for h in handles:
            h.remove()
    assert max(ran) == 1  # blocks 2 and 3 never ran


def test_a_text_longer_than_the_context_is_refused_naming_it_before_any_batch(lm, monkeypatch) -> None:
    """The tiny model has 256 positions: a 10 MB line is refused by its length in characters (never
    tokenised), a 300-token one by its token count; the message names the example."""
    calls = []
    real = lm.tokenizer.__class__.__call__

    def spy(self, text, *a, **k):
        calls.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return real(self, text, *a, **k)

    monkeypatch.setattr(lm.tokenizer.__class__, "__call__", spy)
    huge = "word " * 2_000_000
    with pytest.raises(DataError, match="negative example 2 has .* characters.*context of 256"):
        ss.extract(lm, ["a", "b"], ["c", huge], layers=[1])
    assert not calls or max(calls) < 100_000  # the 10 MB text was never tokenised
    with pytest.raises(DataError, match="positive example 1 is .* tokens long"):
        ss.extract(lm, ["hello " * 300, "b"], ["c", "d"], layers=[1])
    with pytest.raises(DataError, match="text 1 is"):
        ss.collect(lm, ["hello " * 300], layers=[1])


def test_paper_c_pca_is_the_centred_top_direction_and_can_be_orthogonal_to_dim():
    g = torch.Generator().manual_seed(0)
    d = 32
    mu, w = torch.zeros(d), torch.zeros(d)
    mu[0], w[1] = 1.0, 1.0
    neg = torch.randn(50, d, generator=g)
    s = torch.randn(50, 1, generator=g) * 5.0
    s = s - s.mean()  # the pairs' differences vary most along w, orthogonal to their mean mu
    pos = neg + mu + s * w + 0.01 * torch.randn(50, d, generator=g)
    dim, paper = aggregate.diff_in_means(pos, neg), aggregate.METHODS["pca_paper"](pos, neg)
    assert float(paper.norm()) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(torch.cosine_similarity(dim, paper, 0))) < 0.1  # far from DIM (= mu)
    assert abs(float(paper @ w)) > 0.99
    # when the differences vary along their mean, the paper's PCA is DIM's direction up to sign
    pos2 = neg + (1 + 0.5 * torch.randn(50, 1, generator=g)) * mu + 0.01 * torch.randn(50, d, generator=g)
    cos = float(torch.cosine_similarity(aggregate.diff_in_means(pos2, neg), aggregate.METHODS["pca_paper"](pos2, neg), 0))
    assert abs(cos) > 0.99
