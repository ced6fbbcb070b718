"""Planted mechanisms (steerscope.analyses.planted): blind and amplified readers, checked through the
model's own forward (recorded sites and module outputs), not through the surgery's own formulas."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

import steerscope as ss
from conftest import batch_ids, make_tiny
from steerscope.analyses import planted as P
from steerscope.analyses.identifiability import random_orthogonal
from steerscope.errors import SiteError, VectorError

LAYER = 1
FAMILIES = ["llama", "gemma3_text"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    lm = make_tiny(request.param, seed=2)
    lm.model.requires_grad_(False)  # weights are compared, never trained
    return lm


def _vec(lm, seed: int = 0) -> torch.Tensor:
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _record(lm, sites, vec=None, alpha: float = 0.0, modules=()):
    """Recorded sites and module outputs of one forward on a fixed batch (steered when ``vec``)."""
    outs: dict[str, torch.Tensor] = {}
    hooks = {path: (lambda x, _c, path=path: outs.__setitem__(path, x.detach().clone())) for path in modules}
    with ExitStack() as stack, torch.no_grad():
        if vec is not None:
            stack.enter_context(ss.steering(lm, vec, alpha))
        cache = stack.enter_context(ss.recording(lm, sites))
        stack.enter_context(ss.attached(lm, hooks))
        lm.model(**batch_ids(n=2, length=9))
    return {**{s: cache[s] for s in sites}, **outs}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _alpha(lm, site: str, s: torch.Tensor) -> float:
    """A dose with |alpha s| = the mean residual norm at ``site`` (large enough to change every read)."""
    x = _record(lm, [site])[site]
    return float(x.norm(dim=-1).mean() / s.norm())


def _path(lm, module) -> str:
    return next(n for n, m in lm.model.named_modules() if m is module)


# -- the reads, through the model's own forward ---------------------------------------------------
def test_blind_qkv_outputs_change_only_by_the_rms_ratio_when_steered(tiny):
    s = _vec(tiny)
    pre, names = f"blocks.{LAYER}.resid_pre", [f"blocks.{LAYER}.attn.{w}" for w in "qkv"]
    alpha, vec = _alpha(tiny, pre, s), ss.SteeringVector({LAYER: s})
    new = P.blind(tiny, s, LAYER, ("q", "k", "v"))
    for lm, blinded in ((new, True), (tiny, False)):
        base, steered = _record(lm, [pre, *names]), _record(lm, names, vec, alpha)
        eps = _eps(lm.norm(LAYER, "input"))
        ratio = (_rms(base[pre], eps) / _rms(base[pre] + alpha * s, eps))[..., None]  # [batch pos 1 1]
        errs = [_rel(steered[n], base[n] * ratio) for n in names]
        assert (max(errs) < 1e-4) if blinded else (min(errs) > 1e-2), errs


def test_blind_mlp_input_projections_change_only_by_the_rms_ratio_when_steered_at_resid_mid(tiny):
    s = _vec(tiny, 1)
    mid = f"blocks.{LAYER}.resid_mid"
    alpha, vec = _alpha(tiny, mid, s), ss.SteeringVector({LAYER: s}, site="resid_mid")
    new = P.blind(tiny, s, LAYER, ("mlp",))
    for lm, blinded in ((new, True), (tiny, False)):
        mods = [_path(lm, m) for m in P.mlp_readers(lm, LAYER)]
        assert len(mods) == 2 and {p.rsplit(".", 1)[1] for p in mods} == {"gate_proj", "up_proj"}
        base, steered = _record(lm, [mid], modules=mods), _record(lm, [], vec, alpha, modules=mods)
        eps = _eps(lm.norm(LAYER, "pre_mlp"))
        ratio = _rms(base[mid], eps) / _rms(base[mid] + alpha * s, eps)
        errs = [_rel(steered[m], base[m] * ratio) for m in mods]
        assert (max(errs) < 1e-4) if blinded else (min(errs) > 1e-2), errs


def test_blind_mlp_weights_annihilate_the_normed_image_at_every_later_layer(tiny):
    s = _vec(tiny, 1)
    new = P.blind(tiny, s, LAYER, ("mlp",))
    for l in range(LAYER, tiny.n_layers):
        gs = tiny.gamma(l, "pre_mlp") * s
        for old, m in zip(P.mlp_readers(tiny, l), P.mlp_readers(new, l)):
            assert float((m.weight @ gs).norm()) < 1e-5 * float(old.weight.norm() * gs.norm())
            assert float((old.weight @ gs).norm()) > 1e-2 * float(old.weight.norm() * gs.norm())


def test_blind_unembed_logits_change_only_by_the_rms_ratio_when_steered_before_the_final_norm(tiny):
    s, last = _vec(tiny, 2), tiny.n_layers - 1
    post = f"blocks.{last}.resid_post"
    alpha, vec = _alpha(tiny, post, s), ss.SteeringVector({last: s}, site="resid_post")
    new = P.blind(tiny, s, LAYER, ("unembed",))
    for lm, blinded in ((new, True), (tiny, False)):
        base, steered = _record(lm, [post, "logits"]), _record(lm, ["logits"], vec, alpha)
        eps = _eps(lm.final_norm)
        ratio = _rms(base[post], eps) / _rms(base[post] + alpha * s, eps)
        err = _rel(steered["logits"], base["logits"] * ratio)
        assert (err < 1e-4) if blinded else (err > 1e-2), err
        x = base[post]  # the same through the final norm and LM head modules
        with torch.no_grad():
            direct = lm.unembedding(lm.final_norm(x + alpha * s))
            assert (_rel(direct, lm.unembedding(lm.final_norm(x)) * ratio) < 1e-4) == blinded


# -- what is not touched ------------------------------------------------------------------------
def _expected_changed(lm, reads) -> set[str]:
    fam, names = lm.family, set()
    paths = {"q": fam.q_proj, "k": fam.k_proj, "v": fam.v_proj}
    for l in range(LAYER, lm.n_layers):
        names |= {f"{fam.blocks}.{l}.{paths[r]}.weight" for r in reads if r in paths}
        if "mlp" in reads:
            names |= {f"{fam.blocks}.{l}.{fam.mlp}.{p}.weight" for p in ("gate_proj", "up_proj")}
    return names | ({f"{fam.unembed}.weight"} if "unembed" in reads else set())


@pytest.mark.parametrize("reads", [("k", "mlp"), ("q", "v", "unembed")])
def test_blind_changes_only_the_chosen_readers_at_and_after_the_layer_and_not_the_input(tiny, reads):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    tied = tiny.unembedding.weight is tiny.embedding.weight
    new = P.blind(tiny, _vec(tiny), LAYER, reads)
    after = new.model.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())  # input lm untouched
    assert (tiny.unembedding.weight is tiny.embedding.weight) == tied
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == _expected_changed(tiny, reads)
    assert torch.equal(_path_weight(new, tiny.family.embed), before[f"{tiny.family.embed}.weight"])


def _path_weight(lm, path: str) -> torch.Tensor:
    return lm.model.get_submodule(path).weight


def test_blind_unties_a_tied_lm_head_and_leaves_the_embedding_alone():
    lm = make_tiny("gemma3_text", seed=3)
    assert lm.unembedding.weight is lm.embedding.weight
    new = P.blind(lm, _vec(lm), LAYER, ("unembed",))
    assert new.unembedding.weight is not new.embedding.weight
    assert torch.equal(new.embedding.weight, lm.embedding.weight)
    assert not torch.equal(new.unembedding.weight, lm.unembedding.weight)


# -- amplify and the projector -----------------------------------------------------------------
def test_amplify_scales_the_normed_images_by_factor_and_keeps_the_complement_and_kept_directions(tiny):
    d = torch.stack([_vec(tiny, 4), _vec(tiny, 5)])
    keep, other = _vec(tiny, 6), _vec(tiny, 7)
    new = P.amplify(tiny, d, LAYER, P.READS, 3.0, keep=keep)
    for l in range(LAYER, tiny.n_layers):
        for kind, pairs in (("input", [(tiny.proj(l, w), new.proj(l, w)) for w in "qkv"]),
                            ("pre_mlp", list(zip(P.mlp_readers(tiny, l), P.mlp_readers(new, l))))):
            g = tiny.gamma(l, kind)
            u = (g * d).T  # [d_model 2]
            for old, m in pairs:
                W, W2 = old.weight.double(), m.weight.double()
                assert _rel(W2 @ u.double(), 3.0 * W @ u.double()) < 1e-5
                assert _rel(W2 @ (g * keep).double(), W @ (g * keep).double()) < 1e-5
                assert _rel(W2 @ (g * other).double(), W @ (g * other).double()) > 1e-3  # the rest moves
    assert _rel(new.W_U().double() @ (tiny.final_gamma * d).T.double(),
                3.0 * tiny.W_U().double() @ (tiny.final_gamma * d).T.double()) < 1e-5


def test_amplify_factor_zero_is_blind(tiny):
    s = _vec(tiny)
    a, b = P.amplify(tiny, s, LAYER, ("v",), 0.0), P.blind(tiny, s, LAYER, ("v",))
    assert torch.equal(a.proj(LAYER, "v").weight, b.proj(LAYER, "v").weight)


def test_normed_projector_is_orthogonal_without_keep_and_oblique_with_it():
    g = torch.rand(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    d = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d[2] = 2 * d[0]  # rank 2
    images = (g * d).T  # [d_model 3]
    u, b = P.normed_projector(g, d)
    p = u @ b
    assert u.shape == (8, 2) and torch.allclose(p, p.T) and torch.allclose(p @ images, images)
    keep = torch.randn(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, b = P.normed_projector(g, d, keep=keep)
    p = u @ b
    assert torch.allclose(p @ images, images) and torch.allclose(p @ p, p)
    assert float((p @ (g * keep)).norm()) < 1e-12
    with pytest.raises(VectorError, match="keep"):
        P.normed_projector(g, d, keep=d[0] + d[1])


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_layernorm_families_are_refused_with_a_site_error(family):
    lm = make_tiny(family)
    with pytest.raises(SiteError, match="RMS"):
        P.blind(lm, _vec(lm), LAYER, ("q",))


def test_bad_reads_layers_and_directions_are_refused(tiny):
    s = _vec(tiny)
    with pytest.raises(SiteError, match="reads"):
        P.blind(tiny, s, LAYER, ("o",))
    with pytest.raises(SiteError, match="reads"):
        P.blind(tiny, s, LAYER, ())
    with pytest.raises(SiteError, match="layer"):
        P.blind(tiny, s, tiny.n_layers, ("q",))
    with pytest.raises(VectorError, match="d_model"):
        P.blind(tiny, s[:-1], LAYER, ("q",))
    with pytest.raises(VectorError, match="non-zero"):
        P.blind(tiny, torch.zeros(tiny.d_model), LAYER, ("q",))
    with pytest.raises(VectorError, match="finite"):
        P.amplify(tiny, s, LAYER, ("q",), float("inf"))


# -- the case table -----------------------------------------------------------------------------
NAMES = ["attn_blind", "mlp_blind", "unembed_blind", "only_attn", "only_mlp", "only_direct", "only_values",
         "only_qk", "no_effect", "null_perp", "perp_amplified", "unaltered"]


def test_case_table_names_and_claims_are_well_formed():
    assert [c.name for c in P.CASES] == NAMES
    for c in P.CASES:
        assert set(c.expected) <= set(P.CLAIMS), c.name
        assert set(c.expected.values()) <= {"supported", "contradicted"}, c.name
    assert dict(P.CASES[-1].expected) == {}
    with pytest.raises(TypeError):
        P.CASES[0].expected["attr.mlp"] = "supported"  # type: ignore[index]


def test_every_case_builds_and_runs(tiny):
    vec = ss.SteeringVector({LAYER: _vec(tiny)})
    ids = batch_ids(n=1, length=5)
    for case in P.CASES:
        planted = case.surgery(tiny, vec)
        assert isinstance(planted, ss.LM)
        assert (planted is tiny) == (case.name == "unaltered")
        with torch.no_grad(), ss.steering(planted, vec, 2.0):
            assert torch.isfinite(planted.model(**ids).logits).all(), case.name


def test_null_perp_blinds_the_cards_random_orthogonal_directions_and_keeps_s(tiny):
    s = _vec(tiny)
    case = next(c for c in P.cases(seeds=(0, 4)) if c.name == "null_perp")
    new = case.surgery(tiny, ss.SteeringVector({LAYER: s}))
    perps = [random_orthogonal(s, seed=i) for i in (0, 4)]
    assert torch.equal(P.perp_directions(s, (0, 4)), torch.stack(perps))
    for l in (LAYER, tiny.n_layers - 1):
        g = tiny.gamma(l, "input")
        W, W2 = tiny.proj(l, "v").weight, new.proj(l, "v").weight
        assert _rel(W2 @ (g * s), W @ (g * s)) < 1e-5
        assert all(float((W2 @ (g * p)).norm()) < 1e-5 * float((W @ (g * p)).norm()) for p in perps)
    unchanged_below = [tiny.proj(l, "q").weight for l in range(LAYER)]
    assert all(torch.equal(w, new.proj(l, "q").weight) for l, w in enumerate(unchanged_below))


@pytest.mark.slow
def test_smollm2_blind_heads_and_unembed_are_exact_through_the_forward(smol):
    layer, s = 12, _vec(smol, 3)
    pre, names = f"blocks.{layer}.resid_pre", [f"blocks.{layer}.attn.{w}" for w in "qkv"]
    alpha, vec = _alpha(smol, pre, s), ss.SteeringVector({layer: s})
    q_before = smol.proj(layer, "q").weight.clone()
    new = P.blind(smol, s, layer, ("q", "k", "v", "unembed"))
    base, steered = _record(new, [pre, *names]), _record(new, names, vec, alpha)
    eps = _eps(new.norm(layer, "input"))
    ratio = (_rms(base[pre], eps) / _rms(base[pre] + alpha * s, eps))[..., None]
    assert max(_rel(steered[n], base[n] * ratio) for n in names) < 1e-4
    last = smol.n_layers - 1
    post, at_end = f"blocks.{last}.resid_post", ss.SteeringVector({last: s}, site="resid_post")
    base, steered = _record(new, [post, "logits"]), _record(new, ["logits"], at_end, alpha)
    ratio = _rms(base[post], _eps(new.final_norm)) / _rms(base[post] + alpha * s, _eps(new.final_norm))
    assert _rel(steered["logits"], base["logits"] * ratio) < 1e-4
    assert new.unembedding.weight is not new.embedding.weight
    assert smol.unembedding.weight is smol.embedding.weight
    assert torch.equal(smol.proj(layer, "q").weight, q_before)
