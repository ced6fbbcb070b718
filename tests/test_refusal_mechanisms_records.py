"""The refusal-mechanisms study's typed records: JSON round trips, and run folders written before the
records (tests/data/refusal_mechanisms_run: a --quick run on a tiny random model, made by the dict-based
code) still resume, summarise and render."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from steerscope.analyses.records import Record
from steerscope.runs import Run
from steerscope.studies.refusal_mechanisms import records as rc
from steerscope.studies.refusal_mechanisms import steps as St
from steerscope.studies.refusal_mechanisms.config import Config
from steerscope.studies.refusal_mechanisms.pipeline import summary, write_report
from test_refusal_mechanisms_fixtures import one_thread, tiny_lm, tiny_vector  # noqa: F401

OLD_RUN = Path(__file__).parent / "data" / "refusal_mechanisms_run"
NAMES = ["dim", "po"]


def _record_class(step: str) -> type[Record]:
    """The record class of a step of the fixture run, by its name."""
    classes = {rc.EXACT_CHECK: rc.ExactCheckRecord, rc.iou_step(): rc.IouRecord}
    classes |= {rc.ablations_step(s): rc.AblationsRecord for s in rc.SETTINGS}
    classes |= {rc.circuit_compare_step(s): rc.CircuitCompareRecord for s in rc.SETTINGS}
    for n in NAMES:
        classes |= {rc.svv_step(n): rc.SvvRecord, rc.sparsity_step(n): rc.SparsityRecord}
        classes |= {rc.attribution_step(n, s): rc.AttributionRecord for s in rc.SETTINGS}
        classes |= {rc.circuits_step(n, s): rc.CircuitsRecord for s in rc.SETTINGS}
    return classes[step]


@pytest.mark.parametrize("path", sorted((OLD_RUN / "steps").glob("*.json")), ids=lambda p: p.stem)
def test_old_step_json_reads_as_a_record_and_writes_the_same_keys_and_values(path: Path) -> None:
    data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    rec = _record_class(path.stem).from_dict(data)
    assert json.dumps(rec.to_dict()) == json.dumps(data)  # same keys, same order, same values


def test_older_records_without_the_later_keys_keep_them_out_of_the_json() -> None:
    a = {"setting": "bypass", "alpha": -1.0, "n": 4, "unsteered": 0.0, "none": 0.5, "qk": 0.5, "ov": 0.25,
         "svv": 0.5, "mlp": 0.5}
    assert rc.AblationsRecord.from_dict(a).to_dict() == a
    assert rc.Heldout.from_dict({"n": 0, "note": "none left"}).to_dict() == {"n": 0, "note": "none left"}
    att = json.loads((OLD_RUN / "steps" / "attribution_dim_bypass.json").read_text())
    old = {k: v for k, v in att.items() if not k.startswith(("_", "fallback", "rows_common"))}
    rec = rc.AttributionRecord.from_dict(old)
    assert rec.to_dict() == old and rec.fallback_fired() == (rec.n_flipped < 2)


def test_the_old_run_resumes_with_the_same_summary_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    run = Run(out)
    assert all(run.done(p.stem) for p in (out / "steps").glob("*.json"))  # every record still valid
    want = json.loads((out / "summary.json").read_text())
    assert json.dumps(summary(run, NAMES)) == json.dumps(want)
    html = write_report(out).read_text()
    for section in ("EAP-IG vs exact", "Attribution", "held-out faithfulness", "Frozen attention", "PatternJudge",
                    "Steering value vectors", "Sparsification", "random-vector null"):
        assert section in html, section
    recs = rc.StudyRecords.load(run, NAMES)
    assert recs.circuits[("dim", "bypass")].minimal_edges == want["minimal_circuit_dim_bypass"]["edges"]
    assert recs.iou is not None and {"ie:dim-po", "paper:dim-po"} <= set(recs.iou.null)


@pytest.mark.usefixtures("one_thread")
def test_a_step_record_round_trips_through_the_run_store(tmp_path: Path) -> None:
    lm = tiny_lm(layers=2, hidden=32, heads=2, kv=1)
    vec = tiny_vector(lm, layer=1, scale=2.0)
    cfg = Config(n_eval=2, n_ablate=0, eval_tokens=4, batch_size=2)
    run = Run(tmp_path / "run", config=cfg.identity())
    rec = St.step_ablations(run, lm, cfg, vec, "bypass")
    assert rc.AblationsRecord.from_dict(rec.to_dict()) == rec
    name = rc.ablations_step("bypass")
    assert run.record(name, rc.AblationsRecord, lambda: rec) == rec
    assert Run(tmp_path / "run").load_record(name, rc.AblationsRecord) == rec  # rebuilt from the JSON on disk
    assert list(json.loads((tmp_path / "run" / "steps" / f"{name}.json").read_text()))[:12] == [
        "setting", "alpha", "n", *rc.ABLATION_MODES, "each", "each_judge", "samples"]
