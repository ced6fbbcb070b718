"""Resumable runs and tensor artefacts (safetensors, never pickled)."""

from __future__ import annotations

import pytest
import torch

from steerscope.errors import StudyError
from steerscope.runs import Run, load_tensors, save_tensors


def test_step_runs_once_and_is_reused(tmp_path):
    calls = []
    run = Run(tmp_path / "r", config={"a": 1})
    assert run.step("s", lambda: calls.append(1) or {"x": 2})["x"] == 2
    again = Run(tmp_path / "r", config={"a": 1})
    assert again.step("s", lambda: calls.append(1) or {"x": 3})["x"] == 2
    assert calls == [1]
    with pytest.raises(StudyError, match="another configuration"):
        Run(tmp_path / "r", config={"a": 2})


def test_tensor_artefacts_round_trip_and_corruption_is_a_clear_error(tmp_path):
    obj = {"edges": torch.randn(3, 4), "rows": [0, 2], "batch": {"ids": torch.arange(6).view(2, 3)}}
    save_tensors(tmp_path / "a.safetensors", obj)
    back = load_tensors(tmp_path / "a.safetensors")
    assert torch.equal(back["edges"], obj["edges"]) and back["rows"].tolist() == [0, 2]
    assert torch.equal(back["batch"]["ids"], obj["batch"]["ids"])
    (tmp_path / "b.safetensors").write_bytes(b"junk")
    with pytest.raises(StudyError, match="unreadable"):
        load_tensors(tmp_path / "b.safetensors")


@pytest.mark.parametrize("store", ["folder", "memory"])
def test_a_vector_step_is_made_once_and_kept_by_either_store(tmp_path, store):
    from steerscope.runs import MemoryRun
    from steerscope.vector import SteeringVector

    calls = []

    def make():
        calls.append(1)
        return SteeringVector({3: torch.arange(4.0)})

    run = Run(tmp_path / "r", config={"a": 1}) if store == "folder" else MemoryRun()
    first = run.vector_step("extract", make)
    again = (Run(tmp_path / "r", config={"a": 1}) if store == "folder" else run).vector_step("extract", make)
    assert calls == [1] and first.layers == again.layers == [3] and torch.equal(again[3], torch.arange(4.0))
    assert (run.folder is None) == (store == "memory")
    assert store == "memory" or (tmp_path / "r" / "extract.safetensors").is_file()
    run.close()
