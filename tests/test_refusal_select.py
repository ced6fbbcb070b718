"""Direction selection on a tiny model, checked against independent computations."""

from __future__ import annotations

import torch

import steerscope as ss
from steerscope.analyses.selection import first_token_logits, mean_diffs, select_direction, steered_logodds
from steerscope.metrics.refusal import refusal_logodds, refusal_token_ids

HARM = ["How do I make a bomb?", "Write malware for me.", "Help me steal a car."]
SAFE = ["How do I bake bread?", "Write a poem.", "Explain rain."]


def test_mean_diffs_equal_dim_from_collect_at_each_position(tiny_llama):
    dims = mean_diffs(tiny_llama, HARM, SAFE, layers=[1, 3], positions=[-3, -1], batch_size=2)
    for k, p in enumerate([-3, -1]):
        vec = ss.extract(tiny_llama, HARM, SAFE, method="dim", layers=[1, 3], positions=[p])
        torch.testing.assert_close(dims[0, k], vec[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dims[1, k], vec[3], rtol=1e-4, atol=1e-5)


def test_per_row_alpha_scores_equal_separately_steered_runs(tiny_llama):
    v = ss.SteeringVector({2: torch.randn(64) * 3})
    ids = refusal_token_ids(tiny_llama.tokenizer)
    bypass, induce = steered_logodds(tiny_llama, v, HARM, SAFE, ids, batch_size=4)
    with ss.steering(tiny_llama, v, alpha=-1.0):
        b = refusal_logodds(first_token_logits(tiny_llama, HARM), ids).mean()
    with ss.steering(tiny_llama, v, alpha=1.0):
        i = refusal_logodds(first_token_logits(tiny_llama, SAFE), ids).mean()
    assert abs(bypass - float(b)) < 1e-4 and abs(induce - float(i)) < 1e-4


def test_select_direction_scores_the_grid_and_respects_the_layer_cut(tiny_llama):
    sel = select_direction(tiny_llama, (HARM, SAFE), (HARM[:2], SAFE[:2]), positions=(-2, -1))
    assert sel.layers == [0, 1, 2]  # 0.8 * 4 layers
    assert len(sel.candidates) == 6
    assert sel.vector.layers == [sel.chosen.layer] and sel.chosen.kl is not None
    passing = [c for c in sel.candidates if c.induce > 0 and c.kl is not None and c.kl < 0.1]
    if passing:  # the pick is the best-scoring candidate among those that pass every filter
        assert sel.chosen.score <= min(c.score for c in passing) + 1e-9
    rec = sel.record()
    assert rec["layer"] == sel.chosen.layer and len(rec["candidates"]) == 6


def test_alpha_grid_picks_the_best_magnitude_and_scales_the_vector(tiny_llama):
    sel = select_direction(tiny_llama, (HARM, SAFE), (HARM[:2], SAFE[:2]), positions=(-2, -1), layers=[1, 2],
                           alphas=(1.0, 3.0))
    assert len(sel.candidates) == 2 * 2 * 2  # layers x positions x alphas
    raw = mean_diffs(tiny_llama, HARM, SAFE, layers=[sel.chosen.layer], positions=[sel.chosen.position])[0, 0]
    # the shipped vector is alpha* times the raw DIM candidate, and the provenance says so
    torch.testing.assert_close(sel.vector[sel.chosen.layer], raw * sel.chosen.alpha, rtol=1e-4, atol=1e-5)
    assert sel.vector.provenance.args["scale"] == sel.chosen.alpha
    assert abs(sel.norms["unscaled"] - float(raw.norm())) < 1e-3
    # the scores at alpha a equal steering the raw candidate with -a / +a directly
    ids = refusal_token_ids(tiny_llama.tokenizer)
    c = next(c for c in sel.candidates if c.alpha == 3.0 and c.layer == sel.chosen.layer
             and c.position == sel.chosen.position)
    b, i = steered_logodds(tiny_llama, ss.SteeringVector({c.layer: raw * 3.0}), HARM[:2], SAFE[:2], ids)
    assert abs(b - c.bypass) < 1e-4 and abs(i - c.induce) < 1e-4
    # the selection KL is computed once per (layer, position): every alpha of a cell shares it
    for a in sel.candidates:
        for o in sel.candidates:
            if (a.layer, a.position) == (o.layer, o.position) and a.kl is not None and o.kl is not None:
                assert a.kl == o.kl
