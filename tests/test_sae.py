"""The TopK SAE against data with a known sparse dictionary; AUROC against brute-force pair counting."""

import pytest
import torch

from steerscope.analyses.sae import SAEConfig, SAEError, TopKSAE, auroc, max_abs_cosine, sae_metrics, train_sae


def _sparse_data(n=4000, d=32, m=48, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(m, d, generator=g)
    dic = dic / dic.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    coef = torch.zeros(n, m).scatter(1, idx, 1.0 + torch.rand(n, k, generator=g))
    return coef @ dic + 5.0, dic  # an offset, as residual streams have


def test_topk_sae_reconstructs_sparse_data_and_recovers_the_dictionary():
    x, dic = _sparse_data()
    fit = train_sae(x, SAEConfig(width=96, k=3, steps=3000, batch_size=256, lr=3e-3, seed=0))
    assert fit.fve > 0.9
    assert fit.l0 <= 3.0 + 1e-9
    cos = (dic @ fit.sae.W_dec.detach().T).max(1).values  # best feature for each true atom
    assert float((cos > 0.9).float().mean()) > 0.8
    fve, l0, _ = sae_metrics(fit.sae, x)
    assert fve == pytest.approx(fit.fve) and l0 == pytest.approx(fit.l0)


def test_sae_with_k_equal_width_and_identity_like_data_beats_mean_prediction():
    x, _ = _sparse_data(n=500, d=8, m=8, k=2)
    fit = train_sae(x, SAEConfig(width=8, k=8, steps=500, lr=1e-2))
    assert fit.fve > 0.95  # no sparsity constraint left: nearly exact


def test_training_is_deterministic_for_a_seed_and_differs_across_seeds():
    x, _ = _sparse_data(n=600)
    a = train_sae(x, SAEConfig(width=32, k=3, steps=50, seed=1)).sae
    b = train_sae(x, SAEConfig(width=32, k=3, steps=50, seed=1)).sae
    c = train_sae(x, SAEConfig(width=32, k=3, steps=50, seed=2)).sae
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_encode_keeps_at_most_k_nonnegative_codes_and_decoder_rows_are_unit():
    sae = TopKSAE(16, 40, 5, scale=2.0, generator=torch.Generator().manual_seed(0))
    z = sae.encode(torch.randn(30, 16))
    assert int((z != 0).sum(1).max()) <= 5 and bool((z >= 0).all())
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-6)
    with pytest.raises(SAEError):
        TopKSAE(16, 4, 5)
    with pytest.raises(SAEError):
        train_sae(torch.randn(1, 4))


def test_auroc_equals_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (60, 3), generator=g).float()  # many ties
    y = torch.randint(0, 2, (60,), generator=g)
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean((0, 1))
    assert torch.allclose(auroc(s, y), brute, atol=1e-6)
    assert float(auroc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]))[0]) == 1.0
    with pytest.raises(SAEError):
        auroc(s, torch.zeros(60))


def test_max_abs_cosine_finds_the_aligned_row():
    d = torch.eye(4)
    c, j = max_abs_cosine(d, torch.tensor([0.0, 0.0, -2.0, 0.1]))
    assert j == 2 and c == pytest.approx(2.0 / (4.01 ** 0.5))
