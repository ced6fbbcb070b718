import pytest
import torch

from steerscope.analyses.lens import apply_final_norm, lens_scores, logit_lens
from steerscope.errors import VectorError


def test_lens_scores_dot_and_cosine_match_loops():
    g = torch.Generator().manual_seed(0)
    W, v = torch.randn(20, 8, generator=g), torch.randn(3, 8, generator=g)
    dot = lens_scores(W, v)
    cos = lens_scores(W, v, "cosine")
    for i in range(3):
        for t in range(20):
            assert torch.isclose(dot[i, t], torch.dot(W[t], v[i]), atol=1e-5)
            assert torch.isclose(cos[i, t], torch.nn.functional.cosine_similarity(W[t], v[i], dim=0), atol=1e-5)
    with pytest.raises(VectorError):
        lens_scores(W, v, "nope")


def test_final_norm_matches_the_models_norm_module(tiny_llama):
    lm = tiny_llama
    v = torch.randn(2, lm.d_model)
    norm = lm.module(None, lm.family.final_norm)
    with torch.no_grad():
        ref = norm(v)
    assert torch.allclose(apply_final_norm(v, lm.norm_weight(None, lm.family.final_norm)), ref, atol=1e-5)


def test_logit_lens_finds_the_token_a_vector_points_at(tiny_llama):
    lm = tiny_llama
    W = lm.W_U()
    tok = 1234
    tops = logit_lens(lm, 10 * W[tok], k=3, metric="cosine")
    assert tops[0].ids[0] == tok and tops[0].tokens[0] == lm.tokenizer.decode([tok])
    bottom = logit_lens(lm, -W[tok][None], k=1, metric="cosine", largest=False)
    assert bottom[0].ids[0] == tok
    normed = logit_lens(lm, W[tok][None], k=5, final_norm=True)
    assert len(normed[0].tokens) == 5 and normed[0].scores == sorted(normed[0].scores, reverse=True)
    with pytest.raises(VectorError):
        logit_lens(lm, torch.zeros(3), k=1)
