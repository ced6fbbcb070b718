"""SteeringVector: arithmetic, safetensors I/O with provenance, GGUF control vectors, errors."""

from __future__ import annotations

import os
import stat
import warnings

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.errors import FingerprintWarning, VectorError


def test_arithmetic_and_cosine():
    a = ss.SteeringVector({1: torch.tensor([1.0, 0.0]), 2: torch.tensor([0.0, 2.0])})
    b = ss.SteeringVector({1: torch.tensor([0.0, 1.0])})
    s = a + b
    assert torch.equal(s[1], torch.tensor([1.0, 1.0])) and torch.equal(s[2], torch.tensor([0.0, 2.0]))
    assert torch.equal((a - b)[1], torch.tensor([1.0, -1.0]))
    assert torch.equal((3 * a)[2], torch.tensor([0.0, 6.0]))
    assert a.cosine(b) == {1: pytest.approx(0.0)}
    assert a.normalize().norms() == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}
    assert a.select([2]).layers == [2]


def test_save_load_round_trip_keeps_tensors_and_provenance(tmp_path):
    prov = ss.Provenance(model="m", fingerprint="abc", method="dim", positions=[-1], dataset_hash="h",
                         args={"site": "resid_pre"})
    v = ss.SteeringVector({3: torch.randn(16), 5: torch.randn(16)}, provenance=prov)
    p = v.save(tmp_path / "v.safetensors")
    w = ss.SteeringVector.load(p)
    assert w.layers == [3, 5] and torch.equal(w[3], v[3]) and torch.equal(w[5], v[5])
    assert w.provenance.method == "dim" and w.provenance.fingerprint == "abc" and w.provenance.positions == [-1]
    assert w.site == "resid_pre"


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(VectorError, match="not a readable safetensors"):
        ss.SteeringVector.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(VectorError, match="no 'steerscope' metadata"):
        ss.SteeringVector.load(tmp_path / "foreign.safetensors")
    with pytest.raises(VectorError, match="not found"):
        ss.SteeringVector.load(tmp_path / "missing.safetensors")
    with pytest.raises(VectorError, match="no vector file or shipped vector"):
        ss.SteeringVector.load("nomodel/novector")


def test_malformed_vectors_are_rejected():
    with pytest.raises(VectorError, match="NaN"):
        ss.SteeringVector({1: torch.tensor([float("nan"), 1.0])})
    with pytest.raises(VectorError, match="1-D"):
        ss.SteeringVector({1: torch.zeros(2, 2)})
    with pytest.raises(VectorError, match="one size"):
        ss.SteeringVector({1: torch.zeros(2), 2: torch.zeros(3)})


def test_compatibility_checks_size_layers_and_fingerprint():
    lm = make_tiny("llama")
    with pytest.raises(VectorError, match="another model"):
        ss.SteeringVector({1: torch.zeros(lm.d_model + 1)}).check_compatible(lm)
    with pytest.raises(VectorError, match="out of range"):
        ss.SteeringVector({lm.n_layers: torch.zeros(lm.d_model)}).check_compatible(lm)
    other = ss.SteeringVector({1: torch.ones(lm.d_model)}, provenance=ss.Provenance(fingerprint="0" * 16))
    with pytest.warns(FingerprintWarning):
        other.check_compatible(lm)
    with pytest.raises(VectorError, match="fingerprint"):
        other.check_compatible(lm, strict_fingerprint=True)
    same = ss.SteeringVector({1: torch.ones(lm.d_model)}, provenance=ss.Provenance(fingerprint=lm.fingerprint))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.check_compatible(lm)


def test_gguf_control_vector_round_trip(tmp_path):
    v = ss.SteeringVector({2: torch.randn(32), 4: torch.randn(32)}, provenance=ss.Provenance(model="llama"))
    p = v.export_gguf(tmp_path / "cv.gguf")
    import gguf

    r = gguf.GGUFReader(str(p))
    names = sorted(t.name for t in r.tensors)
    assert names == ["direction.1", "direction.3"]  # llama.cpp adds direction.n to block n's output
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    w = ss.SteeringVector.load(p)
    assert w.layers == [2, 4]
    torch.testing.assert_close(w[2], v[2])
    torch.testing.assert_close(w[4], v[4])
    assert w.provenance.model == "llama"


def test_gguf_export_refuses_layer_zero(tmp_path):
    with pytest.raises(VectorError, match="layer 0"):
        ss.SteeringVector({0: torch.randn(8)}).export_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_honour_the_umask(tmp_path, umask, mode):
    from steerscope.runs import write_json

    old = os.umask(umask)
    try:
        ss.SteeringVector({1: torch.ones(8)}).save(tmp_path / "v.safetensors")
        write_json(tmp_path / "card.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v.safetensors").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "card.json").stat().st_mode) == mode
