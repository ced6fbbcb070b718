"""The refusal-mechanisms study end to end on a tiny random model (--quick), and its resumability."""

from __future__ import annotations

import json

import pytest

from steerscope.cli import main
from steerscope.errors import StudyError
from steerscope.studies.refusal_mechanisms.config import parse_vectors, vectors_from_dir
from test_refusal_mechanisms_fixtures import one_thread, tiny_lm, tiny_vector  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_study_runs_quick_and_resumes(tmp_path, capsys) -> None:
    lm = tiny_lm(layers=2, hidden=32, heads=2, kv=1)
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    vdir = tmp_path / "vectors"
    tiny_vector(lm, layer=1, scale=2.0, seed=1).save(vdir / "refusal-dim.safetensors")
    tiny_vector(lm, layer=1, scale=2.0, seed=2).save(vdir / "refusal-po.safetensors")
    out = tmp_path / "run"
    argv = ["study", "refusal-mechanisms", "--model", str(folder), "--vector-dir", str(vdir), "--quick",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    html = (out / "report.html").read_text()
    assert "Frozen attention" in html and "Sparsification" in html and "<img" in html
    s = res["summary"]
    assert set(s["asr_bypass"]) == {"unsteered", "none", "qk", "ov", "svv", "mlp"}
    assert "dim-po" in s["overlap_bypass"] and "dim-po" in s["overlap_common_bypass"]
    assert s["attribution_fallbacks"]["of"] == 4 and 0 <= s["attribution_fallbacks"]["fired"] <= 4
    held = s["minimal_circuit_dim_bypass"]["heldout"]
    assert held["n"] >= 1 and len(held["minimal_ci95"]) == 2
    paper = s["sparsity_paper_rule_dim_bypass"]
    assert paper["taus"] == [0.0, 0.5] and len(paper["asr"]) == 2 and paper["n"] == 4
    iou = json.loads((out / "steps" / "iou_bypass.json").read_text())
    assert iou["n_null"] == 2 and {"ie:dim-po", "paper:dim-po"} <= set(iou["null"])
    assert all(0 < row["p_value"] <= 1 for row in iou["null"]["ie:dim-po"])
    assert "random-vector null" in html and "held-out faithfulness" in html and "PatternJudge" in html
    abl = json.loads((out / "steps" / "ablations_bypass.json").read_text())
    assert set(abl["each_judge"]) == set(abl["each"]) and len(abl["each_judge"]["ov"]) == abl["n"]
    assert (out / "steps" / "circuits_po_induce.json").is_file()
    assert main(argv) == 0  # second run: every step cached
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(line.endswith("cached") for line in res2["log"])
    (out / "report.html").unlink()
    assert main(argv + ["--report-only"]) == 0  # the report again from the run folder alone
    assert "Frozen attention" in (out / "report.html").read_text()


def test_vector_options_are_checked(tmp_path) -> None:
    with pytest.raises(StudyError):
        parse_vectors("po=x.safetensors")
    with pytest.raises(StudyError):
        vectors_from_dir(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "refusal-dim.safetensors").write_bytes(b"")
    (tmp_path / "d" / "ntp.safetensors").write_bytes(b"")
    assert set(vectors_from_dir(tmp_path / "d")) == {"dim", "ntp"}
