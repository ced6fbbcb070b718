"""The reasoning study: task generator, analyses against independent facts, and the command end to end."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import steerscope as ss
from steerscope import stats
from steerscope.errors import SteerscopeError, VectorError
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.task import DIFFICULTIES, make_problems, split


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_problems_are_deterministic_correct_and_split_disjoint(difficulty):
    a, b = make_problems(20, difficulty, seed=3), make_problems(20, difficulty, seed=3)
    assert a == b and len({p.question for p in a}) == 20
    p = a[0]
    if difficulty in ("add-1d", "add-small", "add", "mul", "two-step"):
        expr = p.question.split("is ")[-1].rstrip("?").replace("the sum of ", "")
        if "and" in expr:
            x, y = expr.split(" and ")
            expr = f"{x}+{y}"
        if not p.question.startswith(("Compute", "Add")):
            assert str(eval(expr)) == p.answer
    train, test = split(30, 20, difficulty, seed=0)
    assert not {q.question for q in train} & {q.question for q in test}
    with pytest.raises(SteerscopeError):
        make_problems(3, "nope")


def test_wilson_interval_and_paired_difference():
    lo, hi = stats.wilson(30, 100)
    assert lo == pytest.approx(0.2189, abs=1e-3) and hi == pytest.approx(0.3958, abs=1e-3)  # textbook values
    m, lo, hi = stats.paired_diff([0, 0, 1, 1], [1, 1, 1, 0])
    assert m == pytest.approx(0.25) and lo < m < hi
    assert an.layer_pair_gain(0.5, 0.3, 0.4, 0.6) == pytest.approx(0.5)
    a, b = [0] * 14 + [1] * 4 + [1] * 5, [1] * 14 + [0] * 4 + [1] * 5
    assert stats.mcnemar_p(a, b) == pytest.approx(2 * 4048 / 2**18)  # binomial(18, 0.5) tail, by hand
    assert stats.mcnemar_p([1, 0], [1, 0]) == 1.0


def test_config_resolves_layers():
    assert ReasoningConfig(layers=("mid", "-1", "0")).resolve_layers(30) == [0, 15, 29]
    with pytest.raises(SteerscopeError):
        ReasoningConfig(layers=("40",)).resolve_layers(30)


def test_qkv_patching_and_persistence_against_known_answers(tiny_llama):
    lm = tiny_llama
    texts = [lm.format_chat(p) for p in ["What is 2 + 3?", "Add 4 and 1."]]
    comps = [" 5", " 4 + 1 = 5"]
    g = torch.Generator().manual_seed(0)
    after_last = ss.SteeringVector({3: torch.randn(lm.d_model, generator=g)}, "mlp_out")
    rows = an.qkv_patching(lm, after_last, texts, comps)
    assert all(abs(r.kl) < 1e-6 for r in rows)  # q/k/v of the last layer do not see this vector
    pen = ss.SteeringVector({2: 3 * torch.randn(lm.d_model, generator=g)}, "mlp_out")
    rows = an.qkv_patching(lm, pen, texts, comps)
    assert len(rows) == (lm.n_heads + 1) + 2 * (lm.n_kv_heads + 1)
    assert max(r.kl for r in rows) > 1e-6
    # the completion log-probs (computed from the completion positions' logits only) equal a full-logits reference
    enc = lm.tokenize([t + c for t, c in zip(texts, comps)], padding_side="left")
    ref = []
    for ctx in (None, ss.steering(lm, pen, 1.0)):
        with torch.no_grad(), ctx or contextlib.nullcontext():
            lp = torch.log_softmax(lm.model(**enc).logits[:, :-1].float(), -1)
        tok = lp.gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        n = [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in comps]
        ref.append(float(torch.stack([tok[i, -k:].sum() for i, k in enumerate(n)]).mean()))
    assert (rows[0].logprob_base, rows[0].logprob_steered) == (pytest.approx(ref[0], abs=1e-4), pytest.approx(ref[1], abs=1e-4))
    per = an.persistence(lm, pen, 2, texts, comps)
    assert per[0].layer == 2 and per[0].cos_s == pytest.approx(1.0, abs=1e-4)  # Δh = s right after the MLP
    assert per[0].cos_mean == pytest.approx(1.0, abs=1e-4) and len(per) == 2
    ft = an.first_token_delta(lm, pen, texts, k=3)
    assert len(ft.up) == 3 and ft.up[0][1] >= ft.up[-1][1] and 0 <= ft.total_variation <= 1


def test_transfer_needs_same_depth_and_width(smol_tokenizer):
    from conftest import make_tiny

    a, b = make_tiny("llama", seed=0, tokenizer=smol_tokenizer), make_tiny("llama", seed=1, tokenizer=smol_tokenizer)
    v = ss.SteeringVector({1: torch.ones(a.d_model)}, "mlp_out", ss.Provenance.for_model(a))
    t = an.transfer_vector(v, b)
    assert torch.equal(t[1], v[1]) and t.provenance.args["source_model"] == a.name
    assert t.provenance.fingerprint == b.fingerprint
    enc = b.tokenize([b.format_chat("hi")])
    with torch.no_grad(), ss.steering(b, t, 1.0):
        steered = b.model(**enc).logits
    assert not torch.allclose(steered, b.model(**enc).logits)
    deep = ss.SteeringVector({1: torch.ones(a.d_model)}, "mlp_out", ss.Provenance(n_layers=30))
    with pytest.raises(VectorError):
        an.transfer_vector(deep, b)


def test_study_command_runs_end_to_end_and_resumes(tiny_llama, tmp_path):
    from steerscope.cli import main

    folder = tmp_path / "tiny-model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    args = ["study", "reasoning", "--model", str(folder), "--preset", "tiny", "--out", str(out), "--n-test", "6",
            "--steps", "2", "--json", "--joint-pairs"]
    assert main(args) == 0
    html = (out / "report.html").read_text()
    for section in ("Accuracy", "Training curves", "Logit lens", "First generated token", "Prefix control",
                    "path patching", "Persistence", "Layer pairs", "Transfer", "LoRA"):
        assert section in html, section
    for section in ("Headline over seeds", "Adaptive token-wise scaling", "Token heatmap", "SAE features", "DiffSAE"):
        assert section in html, section
    assert (out / "steps" / "train_L2_seed1.json").is_file() and (out / "vectors" / "L2_gated.policy.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) >= {"base", "L2", "L3", "all", "lora", "prefix L2", "prefix L3", "random L2"}
    from steerscope.analyses.lens import logit_lens

    for layer in (2, 3):  # each prefix control writes its OWN vector's top lens token (issue 25)
        vec = ss.SteeringVector.load(out / "vectors" / f"L{layer}.safetensors")
        top = logit_lens(tiny_llama, vec[layer][None], k=1)[0].tokens[0]
        assert json.loads((out / "steps" / f"prefix_L{layer}.json").read_text())["token"] == top
    fam = summary["family"]
    assert fam["m"] == len(fam["rows"]) >= 8 and all(r["p_holm"] >= r["p"] for r in fam["rows"])
    assert any(r["test"] == "Wilcoxon signed-rank" for r in fam["rows"])  # pass@1, k = 2 in the tiny preset
    pairs = json.loads((out / "steps" / "pairs.json").read_text())["pairs"]
    assert "joint_eval" in pairs[0] and (out / "vectors" / "pair_L2_L3.safetensors").is_file()
    assert "Tests: one family, Holm-corrected" in html
    assert summary["n_trainable"]["L3"] == tiny_llama.d_model
    assert (out / "ckpt" / "L3" / "state.json").is_file() and (out / "vectors" / "all.safetensors").is_file()
    assert ss.SteeringVector.load(out / "vectors" / "L3.safetensors").site == "mlp_out"
    _check_records_round_trip(out)
    assert list(summary) == ["accuracy", "mcnemar_p_vs_base", "paired_vs_base", "family", "n_trainable", "seconds"]
    assert main(args) == 0  # resume: every step cached
    assert "cached" in (out / "report.html").read_text()
    (out / "steps" / "pairs.json").unlink()
    assert main(args + ["--report-only"]) == 0  # rewrites the report, runs nothing
    assert not (out / "steps" / "pairs.json").exists() and "Layer pairs" not in (out / "report.html").read_text()


def _step_record_class(name: str) -> type:
    from steerscope.studies.reasoning import records as rc

    fixed = {rc.DATA: rc.DataRecord, rc.LENS: rc.LensRecord, rc.FIRST_TOKEN: rc.FirstTokenRecord,
             rc.PATCHING: rc.PatchingRecord, rc.PERSISTENCE: rc.PersistenceRecord, rc.PAIRS: rc.PairsRecord,
             rc.CONTROL: rc.ControlRecord, rc.LORA: rc.LoraRecord, rc.SAE: rc.SaeRecord,
             rc.GATE_VALUES: rc.GateValuesRecord}
    if name in fixed:
        return fixed[name]
    prefixes = (("train_", rc.TrainRecord), ("eval_", rc.EvalRecord), ("transfer_", rc.EvalRecord),
                ("prefix_", rc.PrefixEval))
    return next(cls for p, cls in prefixes if name.startswith(p))


def _check_records_round_trip(out):
    """Every step's stored JSON is rebuilt by its record class, whose ``to_dict`` gives the same keys in the
    same order and the same values (the run folders of the dict-based version read as before)."""
    from steerscope.runs import Run

    run = Run(out)
    names = sorted(p.stem for p in (out / "steps").glob("*.json"))
    assert {"data", "eval_base", "train_L2", "lens", "sae", "pairs", "gate_values", "prefix_L2"} <= set(names)
    for name in names:
        stored = {k: v for k, v in run.load(name).items() if not k.startswith("_")}
        rec = run.load_record(name, _step_record_class(name))
        assert json.dumps(rec.to_dict()) == json.dumps(stored), name
        assert json.dumps(type(rec).from_dict(rec.to_dict()).to_dict()) == json.dumps(stored), name  # NaN-safe equality


def test_a_step_record_round_trips_through_the_run_store(tmp_path):
    from steerscope.runs import Run
    from steerscope.studies.reasoning import records as rc

    ev = an.EvalResult("L2", [1, 0, 1], [1, 0, 0, 1, 1, 0], ["a -> '1'"], k=2).summary()
    assert rc.EvalRecord.from_dict(ev.to_dict()) == ev
    keys = ["name", "greedy_acc", "greedy_ci", "sampled_acc", "sampled_ci", "sampled_ci_kind", "n", "k", "n_sampled",
            "greedy", "sampled", "examples"]  # the keys (and their order) of the dict-based version
    assert list(ev.to_dict()) == keys
    with Run(tmp_path / "run") as run:
        got = run.record(rc.eval_step("L2"), rc.EvalRecord, lambda: ev)
        assert got == ev and run.load_record("eval_L2", rc.EvalRecord) == ev
        stored = json.loads((tmp_path / "run" / "steps" / "eval_L2.json").read_text())
        assert [k for k in stored if not k.startswith("_")] == keys
    row = rc.PairRow([2, 3], ev, gain=0.5)
    assert list(row.to_dict()) == ["pair", "eval", "gain"] and rc.PairRow.from_dict(row.to_dict()) == row
