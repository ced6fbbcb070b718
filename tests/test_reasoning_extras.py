"""The reasoning study's extras (gate, seeds, transfer, SAE statistics) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

import steerscope as ss
from steerscope.analyses.trainable import SteeringBias
from steerscope.studies.reasoning import gate, sae_step, seeds, transfer
from steerscope.studies.reasoning.records import EvalRecord, GateRow, SeedRun
from steerscope.studies.reasoning.task import INSTRUCTION, Problem


def test_token_categories_on_a_formatted_prompt(tiny_llama):
    lm = tiny_llama
    p = Problem("What is 3 + 4?", "7")
    text = lm.format_chat(p.prompt)
    bias = SteeringBias(lm, [2], gate=True)
    row = gate.gate_values(lm, bias, [text], [p])[0]
    cat = dict(zip([t.strip() for t in row.tokens], row.categories))
    assert cat["3"] == "number" and cat["4"] == "number"
    assert cat["What"] == "question" and cat["Put"] == "instruction" and cat["answer"] == "instruction"
    assert cat["<|im_start|>"] == "template" and cat["assistant"] == "template"
    assert "".join(row.tokens) == text and INSTRUCTION in text


def test_gate_values_equal_the_closed_form_with_a_constant_gate(tiny_llama):
    lm = tiny_llama
    bias = SteeringBias(lm, [1], gate=True)
    with torch.no_grad():
        bias.b["1"].fill_(0.3)
    p = Problem("Add 2 and 5.", "7")
    row = gate.gate_values(lm, bias, [lm.format_chat(p.prompt)], [p])[0]
    assert all(g == pytest.approx(1 + math.tanh(0.3), abs=1e-4) for g in row.gate)
    with torch.no_grad():
        bias.w["1"].normal_()
    row = gate.gate_values(lm, bias, [lm.format_chat(p.prompt)], [p])[0]
    assert len(set(row.gate)) > 3 and all(0 <= g <= 2 for g in row.gate)


def test_gate_mass_by_hand():
    rows = [GateRow(["1", "a", "b"], ["number", "template", "template"], [1.5, 0.5, 1.0])]
    m = gate.gate_mass(rows)
    assert m["number"].mass_share == pytest.approx(1.5 / 3.0) and m["template"].token_share == pytest.approx(2 / 3)
    assert m["template"].mean_gate == pytest.approx(0.75) and m["template"].mean_abs_dev == pytest.approx(0.25)


def _ev(g):
    return EvalRecord("x", sum(g) / len(g), (0, 1), None, None, None, len(g), 0, 0, g, [], [])


def test_seeds_summary_by_hand():
    base = _ev([0, 0, 1, 1])
    s = seeds.seeds_summary(base, {"a": SeedRun(0, _ev([1, 1, 1, 1])), "b": SeedRun(1, _ev([0, 0, 1, 0]))})
    assert [r.diff[0] for r in s.rows] == [0.5, -0.25]
    assert s.mean_diff == pytest.approx(0.125) and s.sd_diff == pytest.approx(math.sqrt(2 * 0.375**2))
    assert s.rows[0].gained == 2 and s.rows[1].lost == 1


def test_transfer_summary_pairs_each_direction():
    va = ss.SteeringVector({2: torch.tensor([1.0, 0.0])}, "mlp_out")
    vb = ss.SteeringVector({2: torch.tensor([1.0, 1.0])}, "mlp_out")
    parts = {"A_base": _ev([0, 0, 0, 1]), "A_own": _ev([1, 0, 0, 1]), "B_base": _ev([0, 1, 0, 0]),
             "B_own": _ev([1, 1, 1, 0]), "A_to_B": _ev([1, 1, 0, 0]), "B_to_A": _ev([1, 1, 0, 1])}
    half = transfer.transfer_summary("A", "B", 2, {k: parts[k] for k in ("A_base", "A_own", "B_base", "A_to_B")}, va, None)
    assert set(half.on_B) == {"transferred_vs_base"} and "cosine_a_b" not in half.to_dict()
    t = transfer.transfer_summary("A", "B", 2, parts, va, vb)
    assert t.cosine_a_b == pytest.approx(1 / math.sqrt(2))
    assert t.on_B["transferred_vs_base"].diff[0] == pytest.approx(0.25)
    assert t.on_B["transferred_vs_own"].diff[0] == pytest.approx(-0.25)
    assert t.on_A["transferred_vs_base"].diff[0] == pytest.approx(0.5)
    assert t.on_A["own_vs_base"].diff[0] == pytest.approx(0.25)
    assert list(t.to_dict()) == ["done", "model_a", "model_b", "relation", "layer", "accuracy", "norm_a", "on_A", "on_B",
                                 "cosine_a_b", "norm_b"]
    assert transfer.TransferSummary(False, note="off").to_dict() == {"done": False, "note": "off"}


def test_correctness_finds_a_planted_feature_and_the_null_does_not():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    f = torch.rand(200, 30, generator=g)
    f[:, 7] += 0.8 * y  # one informative feature
    tr = torch.arange(200) % 2 == 0
    c = sae_step.correctness(f, y, tr, seed=0)
    assert c.features is not None and c.features[0] == 7 and c.best_heldout_oriented > 0.8 and c.p_perm < 0.01
    c0 = sae_step.correctness(torch.rand(200, 30, generator=g), y, tr, seed=0)
    assert c0.p_perm > 0.01 and abs(c0.null_mean - 0.5) < 0.1


def test_alignment_sees_a_planted_direction():
    from steerscope.analyses.sae import TopKSAE

    sae = TopKSAE(16, 32, 4, generator=torch.Generator().manual_seed(0))
    s = torch.randn(16)
    with torch.no_grad():
        sae.W_dec[5] = -s / s.norm()
    a = sae_step.alignment(sae, s, seed=0)
    assert a.feature == 5 and a.max_abs_cos == pytest.approx(1.0, abs=1e-5) and a.sign == -1.0
    assert a.random_q95 < 0.99


def test_the_gated_policy_replaces_a_symlink_in_vectors_and_honours_the_umask(tiny_llama, tmp_path, monkeypatch):
    """train_vector's ``vectors/<name>.policy.safetensors`` goes through the atomic writer (issue 26, H1 and S5):
    a symlink there is replaced, not written through (safetensors' own save_file follows it before 0.8), and the
    file gets the umask's mode (save_file 0.8 writes 0600)."""
    import os
    import stat

    from safetensors.torch import load_file

    from steerscope.extract.result import TrainResult
    from steerscope.runs import Run
    from steerscope.studies.reasoning import steps
    from steerscope.studies.reasoning.config import preset

    cfg = preset("tiny", gate=True)
    monkeypatch.setattr(steps, "train_rloo", lambda *a, **k: TrainResult(n_trainable=1))  # no training here
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    with Run(tmp_path / "run", config=cfg.identity()) as run:
        (run.folder / "vectors").mkdir()
        policy = run.folder / "vectors" / "L1.policy.safetensors"
        policy.symlink_to(victim)
        old = os.umask(0o022)
        try:
            steps.train_vector(run, tiny_llama, cfg, "L1", [1])
        finally:
            os.umask(old)
    assert victim.read_text() == "precious\n"
    assert policy.is_file() and not policy.is_symlink() and stat.S_IMODE(policy.stat().st_mode) == 0o644
    assert set(load_file(str(policy))) == {n for n, _ in SteeringBias(tiny_llama, [1], gate=True).named_parameters()}

