"""The refusal study's step records and ``results.json`` as a record: each rebuilds from its stored JSON,
and the JSON keeps the keys of earlier versions (so their run folders and results files are read as before)."""

from __future__ import annotations

import json

from steerscope.studies.refusal import records as rc


def _round_trip(rec):
    return type(rec).from_dict(json.loads(json.dumps(rec.to_dict())))


def _samples() -> rc.Samples:
    return rc.Samples([("How do I pick a lock?", "I can't help.")], [("Bake bread?", "Mix flour...")])


def _evaluate() -> rc.EvaluateRecord:
    unsteered = rc.Unsteered(0.75, 0.0, 3, 0, 0, 1, _samples())
    steered = [rc.Steered("DIM", 1.0, 12.5, 0.25, 0.75, 1.0, 1, 4, 2, 0, _samples())]
    return rc.EvaluateRecord([4, 4], unsteered, steered)


def _selection() -> rc.SelectionRecord:
    cands = [rc.CandidateRecord(16, -1, 2.0, 1.5, None, 1.0, 0.1), rc.CandidateRecord(18, -2, 1.0, 0.5, 0.05, 1.0, 0.2)]
    return rc.SelectionRecord(16, -1, rc.CandidateRecord(16, -1, 2.0, 1.5, 0.03, 1.0), 0.1, 2.5, -3.0, [-1, -2],
                              [16, 18], cands, 12.5, 1.0, {"unscaled": 12.5})


def test_every_step_record_round_trips_through_json():
    recs = [
        rc.OrganismRecord("adapters/organism", {"n_test": [4, 4], "organism_refusal_harmful": 0.9}),
        rc.OrganismRecord(None, None),
        rc.OrganismRecord("run/organism", train={"n_harmful": 10}, losses=[2.0, 1.5]),
        _selection(),
        rc.TrainedDataRecord([rc.TrainingPair("p", "w", "l", -1.0)], 1, 32, 1.0),
        rc.TrainedRecord(12, 4, {"refusal-ntp": rc.Curve([1.0, 0.5], [0.7], 0, 3.0),
                                 "refusal-po": rc.Curve([1.0], [0.9], 0, 2.0)}),
        _evaluate(),
        rc.MatchedRecord(12.5, _evaluate().steered),
    ]
    for rec in recs:
        assert _round_trip(rec) == rec


def test_the_json_keeps_the_keys_of_earlier_versions():
    assert list(rc.OrganismRecord(None, None).to_dict()) == ["adapter", "shipped_stats"]
    assert list(rc.OrganismRecord("a", train={}, losses=[]).to_dict()) == ["adapter", "train", "losses"]
    sel = _selection().to_dict()
    assert "score" not in sel["chosen"] and "score" in sel["candidates"][0]
    assert list(rc.TrainedRecord(1, 2, {"refusal-ntp": rc.Curve([], [], 0, 1.0)}).to_dict()) == [
        "n_train", "n_val", "refusal-ntp"]
    old_row = {k: v for k, v in _evaluate().steered[0].to_dict().items() if not k.endswith("_repetitive")}
    row = rc.Steered.from_dict(old_row)  # a record from before the looping counts
    assert row.harmful_repetitive is None and row.to_dict() == old_row


def test_results_round_trip_with_timings_and_without_trained_vectors():
    res = rc.Results({"model": "organism", "max_new_tokens": 8}, rc.OrganismRecord(None, None), _selection(), None,
                     _evaluate(), {"DIM vs NTP": 0.5}, "shipped", rc.PickCheck(16, [-1], [16, -1]))
    data = json.loads(json.dumps(res.to_json({"select": {"_seconds": 1.5, "_cpu_seconds": 2.0}})))
    assert data["trained"] == {} and data["select"]["_seconds"] == 1.5
    assert rc.Results.from_dict(data) == res
    assert res.model == "organism" and res.max_new_tokens == 8
