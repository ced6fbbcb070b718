"""The identifiability study's logic without a model: config checks, the equivalence guard, effects
on synthetic scores, CLI parsing, the report from records."""

import argparse

import numpy as np
import pytest
import torch

from steerscope.analyses import identifiability as idf
from steerscope.errors import StudyError
from steerscope.runs import Run
from steerscope.studies.identifiability import records as rc
from steerscope.studies.identifiability import report, steps
from steerscope.studies.identifiability.config import PAPER_C, Config
from steerscope.studies.identifiability.equivalence import equivalence


def test_config_rejects_bad_options_with_fix_it_messages():
    with pytest.raises(StudyError, match="--traits"):
        Config(traits=("humour",))
    with pytest.raises(StudyError, match="--offset"):
        Config(offset=2)
    with pytest.raises(StudyError, match="--alphas"):
        Config(alphas=(0.0,))
    assert Config(alphas=(2.0, 4.0, 6.0)).probe_alpha == 4.0


def test_cli_parses_lists_into_the_config():
    p = argparse.ArgumentParser()
    Config.add_arguments(p)
    cfg = Config.from_args(p.parse_args(["--traits", "formality", "--alphas", "1,8", "--seeds", "3", "--offset", "1"]))
    assert cfg.traits == ("formality",) and cfg.alphas == (1.0, 8.0) and cfg.seeds == (3,) and cfg.offset == 1
    with pytest.raises(StudyError, match="numbers"):
        Config.from_args(p.parse_args(["--alphas", "a,b"]))


def _scores(effect_v: float, effect_sum: float, n: int = 40, seeds=(0, 1)) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for s in seeds:
        out[f"formality|none|{s}|neutral"] = {"probe": {"none@0": list(rng.normal(0, 1, n))}}
        base = rng.normal(0, 1, n)
        out[f"formality|dim|{s}|neutral"] = {"probe": {
            "v@4": list(base + effect_v), "v+v_perp@4": list(base + effect_sum + rng.normal(0, 0.05, n)),
            "v_perp@4": list(rng.normal(0, 1, n))}}
    return out


def test_effects_say_equivalent_only_when_v_has_a_real_effect():
    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0, 1))
    usable = {"formality": {"probe": True}}
    rows = steps.effects(cfg, _scores(2.0, 2.0), {"formality": "probe"}, usable)
    (r,) = rows
    assert r.v_vs_none.real_effect and r.v_vs_none.d > 1.5
    assert r.verdict.startswith("equivalent") and r.vperp_sum_vs_v.corr > 0.95
    assert r.effect_retained == pytest.approx(1.0, abs=0.1)
    (r,) = steps.effects(cfg, _scores(2.0, 0.0), {"formality": "probe"}, usable)
    assert r.verdict.startswith("not equivalent")
    (r,) = steps.effects(cfg, _scores(0.0, 0.0), {"formality": "probe"}, usable)
    assert r.verdict.startswith("no real effect")
    (r,) = steps.effects(cfg, _scores(2.0, 2.0), {"formality": None}, {"formality": {"probe": False}})
    assert "not used" in r.verdict


def test_v_perp_is_orthogonal_same_norm_and_differs_by_seed():
    import torch

    v = torch.randn(576)
    a, b = steps.v_perp(v, "formality", 0), steps.v_perp(v, "formality", 1)
    assert abs(float(a @ v)) < 1e-2 and float(a.norm()) == pytest.approx(float(v.norm()), rel=1e-5)
    assert not torch.allclose(a, b)


def test_shift_prompts_cover_all_kinds():
    kinds = {r["shift"] for r in steps.shift_prompts(9)}
    assert kinds == {"topic", "genre", "safety"}


def test_report_renders_from_records(tmp_path):
    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0, 1), shift=False)
    usable = {"formality": {"probe": True}}
    scores = _scores(2.0, 2.0)
    eff = rc.EffectsRecord(steps.effects(cfg, scores, {"formality": "probe"}, usable), [])
    vrec = rc.VectorsRecord.from_dict({"layer": 15, "inject_layer": 15, "norms": {"formality_dim": 13.0},
                                       "files": {}, "cos_dim_pca": {"formality": 0.9}, "cos_traits": {}})
    srec = rc.ScorersRecord.from_dict({
        "scorers": {"formality": [{"kind": "probe", "accuracy": 0.96, "validation": "cv", "usable": True}]},
        "primary": {"formality": "probe"}})
    spec = {"sigma": [3.0, 1.0, 0.1], "rank_threshold": 3, "rank_entropy": 2.2, "null_fraction_threshold": 0.0,
            "null_fraction_entropy": 0.27, "d": 3}
    nrec = rc.NullspaceRecord.from_dict({
        "layers": [15], "n_tokens": 10, "covariance": {"15": spec}, "jacobian": {"15": spec},
        "fd_check": {"layer": 15, "rel_err": [0.01]}, "J_vperp_over_J_v": {"formality": {"J_v": 2.0, "J_vperp": 1.0, "ratio": 0.5}}})
    lrec = rc.LogitsRecord.from_dict({"agreement": [{"trait": "formality", "prompts": "neutral", "alpha": 4.0,
                                                     "vs": "v+v_perp", "l2": 1.0, "top1": 1.0, "top10": 0.9}],
                                      "subspaces": []})
    gens = {"formality|dim|0|neutral": rc.Generations({"v@4": ["Dear Sir"]})}
    eq = equivalence(cfg, scores, {"formality": "probe"})
    path = report.write(Run(tmp_path), cfg, vrec, srec, gens, rc.Scores(scores), eff, lrec, nrec, eq)
    html = path.read_text()
    assert "equivalent" in html and "not a behavioural null space" in html and "<img" in html
    assert "TOST at |d| &lt; 0.2" in html or "TOST at |d| < 0.2" in html
    s = report.summary(cfg, vrec, srec, eff, lrec, nrec, eq)
    assert s["n_conditions_with_real_effect"] == 1 and s["n_without_detected_difference"] == 1
    row = s["equivalence"]["rows"][0]
    assert (row["test"]["n_prompts"], row["test"]["n_seeds"]) == (40, 2) and row["verdict"] in ("equivalent", "undecided")


def test_every_step_record_round_trips_through_json():
    """Each step's record rebuilds from its stored JSON (the store writes ``to_dict()``; NaN as null)."""
    import json

    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0, 1), shift=False)
    rows = steps.effects(cfg, _scores(2.0, 2.0), {"formality": "probe"}, {"formality": {"probe": True}})
    rows += steps.effects(cfg, _scores(0.0, 0.0), {"formality": "probe"}, {"formality": {"probe": True}})
    spec = {"sigma": [3.0, 1.0], "rank_threshold": 2, "rank_entropy": 1.8, "null_fraction_threshold": 0.0,
            "null_fraction_entropy": 0.1, "d": 2}
    recs = [
        rc.VectorsRecord(15, 16, {"formality_dim": 13.0}, {"formality_dim": "v.safetensors"}, {"formality": 0.9}, {}),
        rc.ScorersRecord({"formality": [rc.ScorerCheck("probe", 0.96, "cv", True)]}, {"formality": None}),
        rc.Generations({"none@0": ["hi", "there"]}),
        rc.Scores(_scores(1.0, 1.0)),
        rc.EffectsRecord(rows, rows[:1]),
        rc.LogitsRecord([rc.Agreement("formality", "neutral", 4.0, "none", 1.0, 0.5, 0.9)],
                        [rc.SubspaceRow("formality", 4.0, 5, 0.9, 0.8, 1.0, 2.0, 0.7)]),
        rc.NullspaceRecord.from_dict({"layers": [15], "covariance": {"15": spec}, "jacobian": {"15": spec},
                                      "n_tokens": 4, "J_vperp_over_J_v": {"formality": {"J_v": 2.0, "J_vperp": 1.0,
                                                                                     "ratio": 0.5}}}),
        rc.NullspaceRecord([15], {}, {}, 4, rc.FdCheck(15, [0.01]), {}),
        rc.NullspaceRecord([15], {}, {}, 4, None, {}, {"15": idf.ProbeNullFraction(1000, 25, 0.975)}),
        equivalence(cfg, _scores(2.0, 2.0), {"formality": "probe"}),
    ]
    assert "degenerate_ci" not in rows[0].to_dict() and "fd_check" not in recs[6].to_dict()
    for rec in recs:
        data = json.loads(json.dumps(rec.to_dict()))
        assert type(rec).from_dict(data) == rec


def _eq_scores(d_sum: float, d_pca: float, n: int, seeds=(0, 1), effect_v: float = 2.0, seed: int = 0) -> dict:
    """Scores with known effects: v moves the score by ``effect_v`` SDs; v+v_perp and paper C's PCA vector
    differ from v by ``d_sum`` and ``d_pca`` SDs."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in seeds:
        out[f"formality|none|{s}|neutral"] = {"probe": {"none@0": list(rng.normal(0, 1, n))}}
        out[f"formality|dim|{s}|neutral"] = {"probe": {
            "v@4": list(rng.normal(effect_v, 1, n)), "v+v_perp@4": list(rng.normal(effect_v + d_sum, 1, n)),
            "v_perp@4": list(rng.normal(0, 1, n))}}
        out[f"formality|pca_paper|{s}|neutral"] = {"probe": {"v@4": list(rng.normal(effect_v + d_pca, 1, n))}}
    return out


def test_equivalence_step_decides_each_comparison_on_scores_with_known_d():
    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0, 1, 2), methods=("dim", "pca_paper"), shift=False)
    rec = equivalence(cfg, _eq_scores(0.0, 0.8, 40, seeds=(0, 1, 2)), {"formality": "probe"})
    assert [r.comparison for r in rec.rows] == ["v+v_perp vs v", "v[pca_paper] vs v[dim]"] and rec.family_size == 4
    same, pca = rec.rows
    assert pca.verdict == "different" and pca.test.d == pytest.approx(0.8, abs=0.25)
    assert same.verdict in ("equivalent", "undecided") and same.v_moves_score and same.guard.d > 1.5
    assert (same.test.n_prompts, same.test.n_seeds) == (40, 3)
    # 40 prompts x 3 seeds is too few to show |d| < 0.2 (the power calculation: ~429 per group); 300 x 3 is enough
    assert same.verdict == "undecided"
    big = equivalence(cfg, _eq_scores(0.0, 0.0, 300, seeds=(0, 1, 2)), {"formality": "probe"})
    assert [r.verdict for r in big.rows] == ["equivalent", "equivalent"]
    # a trait without a usable scorer gives no row
    assert equivalence(cfg, _eq_scores(0.0, 0.0, 10), {"formality": None}).rows == []


def test_vperp_ratios_match_a_direct_computation_and_recover_a_planted_share():
    """Paper C's |mean(v_perp)| / |mean(v)| and the shift ratio, against numpy on the same tables; with v_perp
    planted at a quarter of v's shift the shift ratio's interval covers 0.25 and excludes 0."""
    rng = np.random.default_rng(3)
    n, seeds = 60, (0, 1, 2)
    cells = {}
    for s in seeds:
        cells[f"formality|none|{s}|neutral"] = {"probe": {"none@0": list(rng.normal(1.0, 1, n))}}
        cells[f"formality|dim|{s}|neutral"] = {"probe": {
            "v@4": list(rng.normal(3.0, 1, n)), "v+v_perp@4": list(rng.normal(3.0, 1, n)),
            "v_perp@4": list(rng.normal(1.5, 1, n))}}
    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=seeds, shift=False)
    (r,) = equivalence(cfg, cells, {"formality": "probe"}).vperp_ratios
    col = lambda cond, m="dim": np.array([cells[f"formality|{m}|{s}|neutral"]["probe"][cond] for s in seeds]).T
    v, vp, none = col("v@4"), col("v_perp@4"), col("none@0", "none")
    assert (r.n_prompts, r.n_seeds) == (n, 3)
    assert r.ratio_paper == pytest.approx(abs(vp.mean()) / abs(v.mean()), rel=1e-9)
    assert r.ratio_shift == pytest.approx((vp.mean() - none.mean()) / (v.mean() - none.mean()), rel=1e-9)
    lo, hi = r.ratio_shift_ci95
    assert lo < 0.25 < hi and lo > 0 and hi - lo < 0.3
    assert r.ratio_paper_ci95[0] < r.ratio_paper < r.ratio_paper_ci95[1]
    # without a v_perp condition (e.g. pca_paper first is refused; a run with only v) there is no ratio
    for s in seeds:
        del cells[f"formality|dim|{s}|neutral"]["probe"]["v_perp@4"]
    assert equivalence(cfg, cells, {"formality": "probe"}).vperp_ratios == []


def test_flipped_pca_is_compared_with_dim_like_pca_paper():
    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0, 1), methods=("dim", "pca_paper", "pca_paper_flipped"),
                 shift=False)
    cells = _eq_scores(0.0, -3.0, 40)
    rng = np.random.default_rng(1)
    for s in (0, 1):  # the flipped vector steers like DIM here; the SVD-sign one moves the score the other way
        cells[f"formality|pca_paper_flipped|{s}|neutral"] = {"probe": {"v@4": list(rng.normal(2.0, 1, 40))}}
    rec = equivalence(cfg, cells, {"formality": "probe"})
    assert [r.comparison for r in rec.rows] == ["v+v_perp vs v", "v[pca_paper] vs v[dim]",
                                               "v[pca_paper_flipped] vs v[dim]"] and rec.family_size == 6
    assert rec.rows[1].verdict == "different" and abs(rec.rows[2].test.d) < 0.5
    assert steps.effects(cfg, cells, {"formality": "probe"}, {"formality": {"probe": True}})[0].method == "dim"


def test_paper_c_setting_is_a_config_and_its_positions_reach_generate(monkeypatch):
    import torch

    cfg = Config(**PAPER_C)
    assert cfg.alphas == (1.0,) and cfg.positions == "last+generated" and cfg.offset == 1
    assert "positions" in cfg.identity() and "positions" not in Config().identity()  # old run folders still resume
    seen = {}
    monkeypatch.setattr(steps.ss, "generate", lambda lm, rows, **kw: seen.update(kw) or ["x"] * len(rows))
    gen = steps.generate_cell(None, cfg, ["p1", "p2"], torch.ones(8), "formality", 0, 3, cfg.alphas, ("v",))
    assert seen["positions"] == "last+generated" and list(gen.texts) == ["v@1"]
    with pytest.raises(StudyError, match="--methods"):
        Config(methods=("pca_paper",))
    with pytest.raises(StudyError, match="--methods"):
        Config(methods=("pca_paper_flipped", "dim"))
    with pytest.raises(StudyError, match="--margin"):
        Config(margin=0.0)


def test_vectors_step_saves_the_flipped_pca_as_the_negation_at_dims_norm(tiny_llama, tmp_path):
    cfg = Config(traits=("formality",), methods=("dim", "pca_paper", "pca_paper_flipped"), shift=False)
    rec = steps.vectors(Run(tmp_path / "run"), tiny_llama, cfg)
    vecs = steps.load_vectors(rec)
    p, f, d = vecs["formality_pca_paper"], vecs["formality_pca_paper_flipped"], vecs["formality_dim"]
    assert torch.equal(f, -p) and float(f.norm()) == pytest.approx(float(d.norm()), rel=1e-5)
    assert float(torch.cosine_similarity(f, d, 0)) == pytest.approx(-rec.cos_methods["formality|pca_paper"], abs=1e-5)


def test_logits_step_gives_top1_agreement_with_its_interval_over_prompts(tiny_llama, tmp_path):
    cfg = Config(traits=("formality",), alphas=(3.0,), seeds=(0, 1, 2), n_prompts=6, n_shift_prompts=3, ks=(1,),
                 n_k_prompts=1, shift=False)
    vecs = steps.load_vectors(steps.vectors(Run(tmp_path / "run"), tiny_llama, cfg))
    rec = steps.logits(tiny_llama, cfg, vecs, 2)
    row = next(r for r in rec.agreement if r.vs == "v+v_perp" and r.prompts == "neutral")
    assert (row.n_prompts, row.n_draws) == (6, 3) and row.top1_ci95[0] <= row.top1 <= row.top1_ci95[1]
    none = next(r for r in rec.agreement if r.vs == "none" and r.prompts == "neutral")
    ps = steps.neutral_prompts(6)  # against a direct computation: steered vs unsteered top-1 per prompt
    lv = idf.next_token_logits(tiny_llama, ps, {2: 3.0 * vecs["formality_dim"]})
    hits = (lv.argmax(-1) == idf.next_token_logits(tiny_llama, ps).argmax(-1)).double()
    assert none.top1 == pytest.approx(float(hits.mean())) and none.n_draws == 1
    assert type(rec).from_dict(rec.to_dict()) == rec
