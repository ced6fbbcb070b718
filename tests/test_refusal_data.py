"""Refusal data: fixed splits and standard-set loaders."""

from __future__ import annotations

import json

import pytest

from steerscope.data.refusal_prompts import SIDES, load_split, load_standard, make_splits
from steerscope.errors import DataError


def test_shipped_splits_have_the_issue_sizes_and_are_disjoint_and_complete():
    for side in SIDES:
        parts = {s: load_split(side, s) for s in ("train", "val", "test", "organism")}
        assert [len(parts[s]) for s in ("train", "val", "test")] == [128, 32, 100]
        assert len(parts["organism"]) >= 80
        allp = sum(parts.values(), [])
        assert len(set(allp)) == len(allp)


def test_shipped_splits_equal_the_seeded_recipe():
    from steerscope.data import data_path

    assert json.loads(data_path("refusal", "splits.json").read_text()) == make_splits(0)
    assert make_splits(1) != make_splits(0)


def test_organism_only_records_never_leave_the_organism_split():
    from steerscope.data import data_path, read_jsonl

    extra = {r["id"] for r in read_jsonl(data_path("refusal", "harmless.jsonl")) if r.get("organism_only")}
    assert len(extra) >= 150
    for seed in (0, 1):
        sp = make_splits(seed)["harmless"]
        assert extra <= set(sp["organism"])
        assert not extra & set(sp["train"] + sp["val"] + sp["test"])


@pytest.mark.parametrize("name,field", [("advbench", "goal"), ("harmbench", "Behavior"),
                                        ("jailbreakbench", "Goal"), ("strongreject", "forbidden_prompt"),
                                        ("alpaca", "instruction")])
def test_standard_loaders_read_their_field_from_csv_and_json(tmp_path, name, field):
    import csv

    rows = [{field: "first prompt", "other": "x"}, {field: "second prompt", "other": "y"}]
    c = tmp_path / f"{name}.csv"
    with c.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[field, "other"])
        w.writeheader()
        w.writerows(rows)
    j = tmp_path / f"{name}.json"
    j.write_text(json.dumps(rows))
    assert load_standard(name, c) == ["first prompt", "second prompt"]
    assert load_standard(name, j, limit=1) == ["first prompt"]


def test_alpaca_appends_the_input_field(tmp_path):
    p = tmp_path / "alpaca.jsonl"
    p.write_text(json.dumps({"instruction": "Summarise", "input": "A text.", "output": ""}) + "\n")
    assert load_standard("alpaca", p) == ["Summarise\n\nA text."]


def test_bad_standard_inputs_raise_fix_it_errors(tmp_path):
    with pytest.raises(DataError, match="choose one of"):
        load_standard("nope", tmp_path / "x.csv")
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"unrelated": 1}]))
    with pytest.raises(DataError, match="no field"):
        load_standard("advbench", p)
    with pytest.raises(DataError, match="unknown split"):
        load_split("harmful", "nope")
