"""Pure math of steerscope.analyses.identifiability against plain numpy/scipy, and the Jacobian against
finite differences on a tiny random Llama."""

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
import transformers

import steerscope as ss
from steerscope import stats
from steerscope.analyses import identifiability as idf


def test_orthogonal_subspace_is_orthonormal_and_orthogonal_to_v():
    v = torch.randn(64)
    U = idf.orthogonal_subspace(v, 10, seed=3)
    assert U.shape == (10, 64)
    assert torch.allclose(U @ U.T, torch.eye(10), atol=1e-5)
    assert (U @ v).abs().max() < 1e-4
    assert torch.equal(U, idf.orthogonal_subspace(v, 10, seed=3))
    assert not torch.allclose(U, idf.orthogonal_subspace(v, 10, seed=4))


def test_random_orthogonal_has_norm_of_v_and_is_isotropic_in_the_complement():
    v = torch.zeros(8)
    v[0] = 3.0
    ps = torch.stack([idf.random_orthogonal(v, seed=s) for s in range(2000)])
    assert torch.allclose(ps.norm(dim=1), torch.full((2000,), 3.0), atol=1e-4)
    assert ps[:, 0].abs().max() < 1e-4
    # uniform on the sphere of the 7-dim complement: E[x_i^2] = 9 / 7 in each other coordinate
    assert torch.allclose((ps[:, 1:] ** 2).mean(0), torch.full((7,), 9 / 7), rtol=0.15)


def test_orthogonal_subspace_rejects_bad_k():
    with pytest.raises(ss.SteerscopeError, match="between 1 and"):
        idf.orthogonal_subspace(torch.randn(5), 5)


def test_cohens_d_matches_the_pooled_t_statistic():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 30), rng.normal(0, 2, 45)
    t = scipy.stats.ttest_ind(a, b, equal_var=True).statistic
    assert stats.cohens_d(a, b) == pytest.approx(t * np.sqrt(1 / 30 + 1 / 45), rel=1e-10)
    assert stats.cohens_d(b, a) == pytest.approx(-stats.cohens_d(a, b))


def test_bootstrap_ci_covers_the_truth_and_excludes_zero_for_a_real_effect():
    rng = np.random.default_rng(1)
    covered = 0
    for i in range(30):
        a, b = rng.normal(0.8, 1, 40), rng.normal(0, 1, 40)
        lo, hi = stats.bootstrap_ci(a, b, n_boot=300, seed=i)
        covered += lo <= 0.8 <= hi
    assert covered >= 24  # nominal 95%; percentile bootstrap is a bit liberal at n=40
    a, b = rng.normal(2, 1, 40), rng.normal(0, 1, 40)
    c = idf.compare(a, b, paired=True)
    assert c.real_effect and c.ci_low > 0
    same = idf.compare(b, b + rng.normal(0, 1e-3, 40), paired=True)
    assert not same.real_effect and same.corr > 0.99


def test_jsd_matches_scipy():
    p, q = np.array([1, 2, 3, 0, 4.0]), np.array([2, 2, 0, 1, 1.0])
    ref = scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2
    assert stats.jsd(p, q) == pytest.approx(ref, rel=1e-9)
    assert stats.jsd(p, p) == pytest.approx(0.0, abs=1e-12)
    assert stats.histogram_jsd([0, 0, 0.1], [1, 1, 0.9], bins=4) == pytest.approx(1.0)


def test_logit_agreement_matches_numpy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    b[:3] = a[:3] + 0.01
    res = idf.logit_agreement(a, b, k=10)
    A, B = a.numpy(), b.numpy()
    assert res.l2 == pytest.approx(np.linalg.norm(A - B, axis=1).mean(), rel=1e-5)
    assert res.top1 == pytest.approx((A.argmax(1) == B.argmax(1)).mean())
    ov = [len(set(np.argsort(-A[i])[:10]) & set(np.argsort(-B[i])[:10])) / 10 for i in range(6)]
    assert res.topk_overlap == pytest.approx(np.mean(ov))


def test_effective_ranks():
    assert idf.effective_rank_threshold([1.0, 0.5, 0.06, 0.04, 0.0]) == 3
    assert idf.effective_rank_entropy(np.ones(7)) == pytest.approx(7.0)
    assert idf.effective_rank_entropy([1.0, 0, 0]) == pytest.approx(1.0)
    s = idf.spectrum([1, 1, 0, 0], d=4)
    assert s.rank_threshold == 2 and s.null_fraction_threshold == 0.5 and s.null_fraction_entropy == pytest.approx(0.5)


def test_covariance_singular_values_match_numpy_eigenvalues():
    x = torch.randn(200, 12) @ torch.randn(12, 12)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.numpy().T)))[::-1]
    assert np.allclose(idf.covariance_singular_values(x).numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    tok = ss.load_model("smollm2-135m").tokenizer
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    return ss.from_hf(model, tok, name="tiny")


def test_logit_jacobian_matches_central_finite_differences(tiny):
    text = "hello world"
    jf = idf.final_jacobian(tiny, text, layer=1)
    J = tiny.W_U().double() @ jf.double()  # [vocab d_model]
    eps = 1e-3  # Llama's RMSNorm runs in float32 even in a float64 model: noise ~1e-8/eps vs eps^2 truncation
    fd = torch.stack([(idf.logits_with_delta(tiny, text, 1, eps * e) - idf.logits_with_delta(tiny, text, 1, -eps * e))
                      / (2 * eps) for e in torch.eye(32, dtype=torch.float64)[:6]], 1)
    assert ((J[:, :6] - fd).norm(dim=0) / fd.norm(dim=0)).max() < 1e-3
    errs = idf.finite_difference_check(tiny, text, 1, torch.nn.functional.normalize(torch.randn(3, 32, dtype=torch.float64), dim=1), eps=1e-3, jf=jf)
    assert max(errs) < 1e-3


def test_the_kv_cache_is_passed_under_the_forwards_own_keyword(tiny):
    """transformers 5.24+ names it ``cache`` and warns (and will drop) ``past_key_values``: the Jacobian's prefix
    cache goes in under the current name, and prefix + last token on the cache equals one full forward."""
    import inspect

    assert tiny.cache_kw == ("cache" if "cache" in inspect.signature(tiny.model.forward).parameters
                             else "past_key_values")
    ids = tiny.tokenize(["hello world again"])["input_ids"]
    import warnings

    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        past = tiny.cache_of(tiny.model(input_ids=ids[:, :-1], use_cache=True))
        last = tiny.model(input_ids=ids[:, -1:], use_cache=True, **{tiny.cache_kw: past}).logits[0, -1]
        idf.final_jacobian(tiny, "hello world", layer=1)
    assert torch.allclose(last, tiny.model(input_ids=ids).logits[0, -1], atol=1e-8)
    assert not [w for w in seen if "past_key_values" in str(w.message)]


def test_jacobian_spectrum_via_qr_equals_full_svd(tiny):
    jf = idf.final_jacobian(tiny, "abc", layer=2)
    full = torch.linalg.svdvals(tiny.W_U().double() @ jf.double())
    assert torch.allclose(idf.logit_jacobian_spectrum(tiny, "abc", 2).double(), full, rtol=1e-4, atol=1e-6)


def test_next_token_logits_with_deltas_equal_steering_with_per_row_vectors(tiny):
    prompts = ["hello there", "a longer prompt with more tokens"]
    d = torch.randn(2, 32, dtype=torch.float64)
    got = idf.next_token_logits(tiny, prompts, {1: d})
    vecs = [ss.SteeringVector({1: d[i]}) for i in range(2)]
    enc = tiny.tokenize([tiny.format_chat(p) for p in prompts], padding_side="left")
    with ss.steering(tiny, vecs, alpha=1.0), torch.no_grad():
        ref = tiny.model(**enc).logits[:, -1].float()
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, idf.next_token_logits(tiny, prompts), atol=1e-3)


def test_residual_covariance_spectra_equal_numpy_on_each_text_run_alone(tiny):
    """The one covariance spectrum (card and study): resid_pre = hidden_states[l] of each unpadded text, first token dropped."""
    prompts = ["hello there", "a longer prompt with more tokens in it", "x", "what is the time?"]
    got = idf.residual_covariance_spectra(tiny, prompts, [1, 2], batch_size=3)
    for layer in (1, 2):
        rows = []
        for p in prompts:
            enc = tiny.tokenize([tiny.format_chat(p)])
            with torch.no_grad():
                hs = tiny.model(**enc, output_hidden_states=True).hidden_states[layer][0]
            rows.append(hs[1:].double().numpy())
        x = np.concatenate(rows)
        ref = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1][: min(len(x), x.shape[1])]
        rec = got[layer]
        assert rec.layer == layer and rec.n_tokens == len(x) and rec.spectrum.d == tiny.d_model
        assert np.allclose(rec.spectrum.sigma, np.clip(ref, 0, None), rtol=1e-4, atol=1e-6)


def test_neutral_prompts_have_one_loader():
    from steerscope.data import data_path, neutral_prompts, read_jsonl
    from steerscope.explain import dose
    from steerscope.studies.identifiability import steps

    rows = read_jsonl(data_path("traits", "neutral_prompts.jsonl"))
    assert neutral_prompts() == [r["prompt"] for r in rows] and neutral_prompts(3) == neutral_prompts()[:3]
    assert dose.neutral_prompts is steps.neutral_prompts is neutral_prompts


def test_null_space_definitions_on_a_covariance_of_known_rank():
    d, r = 64, 6
    q = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(0)))[0].T  # [r d] orthonormal
    x = torch.cat([q, -q]) * 3.0  # 2r points: mean 0, covariance with r equal non-zero eigenvalues
    s = idf.spectrum(idf.covariance_singular_values(x).numpy(), d)
    assert s.rank_threshold == r and s.null_fraction_threshold == pytest.approx(1 - r / d)
    assert s.rank_entropy == pytest.approx(r, rel=1e-4) and s.null_fraction_entropy == pytest.approx(1 - r / d, abs=1e-4)
    # paper C's definition probes a map of rank r with 1000 unit directions: (1000 - r) / 1000
    jac = torch.randn(40, r, dtype=torch.float64) @ q.double()  # [out d] of rank r
    p = idf.probe_null_fraction(jac, n_probes=1000, seed=1)
    assert (p.rank, p.n_probes) == (r, 1000) and p.null_fraction == pytest.approx((1000 - r) / 1000)
    # the paper's fraction counts probes: a full-rank map (no null space at all) still gets (1000 - d) / 1000
    full = idf.probe_null_fraction(torch.eye(d, dtype=torch.float64), n_probes=1000)
    assert full.rank == d and full.null_fraction == pytest.approx(1 - d / 1000)
    assert idf.spectrum(np.ones(d), d).null_fraction_threshold == 0.0
