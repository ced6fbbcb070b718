"""The refusal-mechanisms study is a composition of the card's sections: for the same prompts and
settings, the card's circuit, frozen and sparsity numbers equal the study's step records."""

from __future__ import annotations

from dataclasses import replace

import pytest

from steerscope.analyses import sparsity as S
from steerscope.explain import Settings, explain
from steerscope.explain import sparsity as ES
from steerscope.runs import Run, load_tensors
from steerscope.studies.refusal_mechanisms import steps as St
from steerscope.studies.refusal_mechanisms.config import Config
from test_refusal_mechanisms_fixtures import one_thread, smol_tokenizer, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(cfg: Config) -> Settings:
    return replace(Settings.quick(), n_tokens=cfg.attr_tokens, ig_steps=cfg.steps, circuit_fracs=cfg.circuit_fracs,
                   threshold=cfg.threshold, bisect_steps=cfg.bisect_steps, gen_tokens=cfg.eval_tokens,
                   seed=cfg.seed)


def _compare(lm, vec, cfg: Config, tmp_path, tol: float = 1e-6) -> None:
    run = Run(tmp_path / "study")
    att = St.step_attribution(run, lm, cfg, "dim", vec, "bypass")
    circ = St.step_circuits(run, lm, cfg, "dim", vec, "bypass")
    abl = St.step_ablations(run, lm, cfg, vec, "bypass")
    sp = St.step_sparsity(run, lm, cfg, "dim", vec, "bypass")
    prompts = [St.attr_prompts(cfg, "bypass")[i] for i in att.rows_used]  # the study's attribution batch
    card = explain(lm, vec, prompts, alpha=cfg.alpha_bypass, settings=_settings(cfg), out=tmp_path / "card",
                   show_progress=False, sections=["attribution", "circuit"])  # the sections compared here
    assert card.circuit.sizes == circ.sizes and card.circuit.n_edges_total == circ.n_edges_total
    assert card.circuit.faithfulness == pytest.approx(circ.faithfulness, abs=tol)
    assert card.circuit.edge_fraction == circ.minimal_fraction
    r = load_tensors(tmp_path / "card" / "tensors" / "attribution.safetensors")["mean_grad"].float()
    s = vec[vec.layers[0]].float()
    for method in S.METHODS:  # the same kept dimensions from the same attribution
        assert [S.keep_mask(method, x, s, r, seed=cfg.seed).nonzero()[:, 0].tolist()
                for x in cfg.sparsities] == sp.keep[method]
    evals = St.eval_prompts(cfg, "bypass")
    curve = ES.scored_curve(lm, evals, vec, cfg.alpha_bypass, r, S.METHODS, cfg.sparsities, St._asr_each,
                            cfg.eval_tokens, cfg.batch_size, cfg.seed)
    assert curve == sp.asr
    card = explain(lm, vec, evals, alpha=cfg.alpha_bypass, scorer="refusal", settings=_settings(cfg),
                   show_progress=False, sections=["frozen"])
    for mode in ("qk", "ov", "svv", "mlp"):  # the card scores the refusal rate; the study reports ASR = 1 - it
        assert 1 - card.frozen.path(mode).scorer_mean == pytest.approx(abl.asr(mode))
    assert 1 - card.frozen.steered_scorer_mean == pytest.approx(abl.none)
    assert 1 - card.frozen.unsteered_scorer_mean == pytest.approx(abl.unsteered)


CFG = Config(n_attr=3, attr_tokens=6, steps=2, n_eval=3, n_ablate=0, eval_tokens=6, circuit_fracs=(0.05, 0.3, 1.0),
             bisect_steps=2, sparsities=(0.5, 0.9))


def test_card_equals_the_study_on_a_tiny_model(tmp_path) -> None:
    lm = tiny_lm(layers=3)
    _compare(lm, tiny_vector(lm, layer=1, scale=4.0), CFG, tmp_path)


@pytest.mark.slow
def test_card_equals_the_study_on_the_organism_with_the_shipped_dim_vector(tmp_path) -> None:
    import steerscope as ss

    lm = ss.load_model("smollm2-135m-safe")
    vec = ss.SteeringVector.load("smollm2-135m-safe/refusal-dim")
    cfg = replace(CFG, n_attr=2, n_eval=3, circuit_fracs=(0.3, 1.0), sparsities=(0.5,))  # CI time: the tiny-model
    # case above checks the same composition on more settings
    # the card re-pads the flipped prompts as its own batch, so allow float round-off
    _compare(lm, vec, cfg, tmp_path, tol=1e-3)
