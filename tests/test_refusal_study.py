"""`steerscope study refusal` end to end on the shipped organism at minimal sizes, and its resumability."""

from __future__ import annotations

import json

import pytest

from steerscope.cli import main

pytestmark = pytest.mark.slow


def test_refusal_study_runs_end_to_end_and_resumes(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["study", "refusal", "--out", str(out), "--n-train", "16", "--n-val", "4", "--layers", "16,18",
            "--n-test", "4", "--max-new-tokens", "8", "--n-trained", "16", "--trained-epochs", "1",
            "--gen-batch", "16", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    assert results["vector_source"] == "this run"
    assert [c["layer"] for c in results["select"]["candidates"][:5]] == [16] * 5  # 2 layers x 5 positions
    assert len(results["select"]["candidates"]) == 10
    methods = [s["method"] for s in res["steered"]]
    assert methods == ["DIM", "NTP", "PO"]
    for name in ("refusal-dim", "refusal-ntp", "refusal-po"):
        assert (out / "vectors" / f"{name}.safetensors").is_file()
    assert set(results["cosines"]) == {"DIM vs NTP", "DIM vs PO", "NTP vs PO"}
    html = (out / "report.html").read_text()
    assert "<img" in html and "ASR" in html
    assert main(argv) == 0  # second run: every step cached
    res2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res2["steps"] and all("cached" in line for line in res2["steps"])
    assert res2["steered"] == res["steered"]
    (out / "report.html").unlink()
    assert main(argv + ["--report-only"]) == 0  # the report again from results.json alone
    assert "ASR" in (out / "report.html").read_text()
