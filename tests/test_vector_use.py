"""The vector file as a contract: the ``use`` record in safetensors and GGUF, ``inspect`` shows it,
and ``steering`` without alpha applies it (issue 23, part 2)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import steerscope as ss
from steerscope.cli import main
from steerscope.errors import RecommendedAlpha, VectorError
from steerscope.vector import Use
from test_refusal_mechanisms_fixtures import one_thread, smol_tokenizer, tiny_lm  # noqa: F401

USE = Use(operation="add", site="resid_pre", layers=[2], positions="prompt", alpha=1.2345678901234567,
          alpha_range=(0.5, 1.2345678901234567), kl_budget=1.0, kl_worst5=0.8125, effect=2.5,
          effect_ci95=(1.0, 3.75), effect_n=15, effect_metric="teacher-forced log-odds (nats)", tuned_on="0123abcd")


def _vec(d: int = 16, use: Use | None = USE, layers=(2, 3)) -> ss.SteeringVector:
    g = torch.Generator().manual_seed(0)
    prov = ss.Provenance(model="tiny", fingerprint=None, method="dim", positions=[-1], dataset_hash="h",
                         n_examples=8, args={"site": "resid_pre", "chat": True}, use=use)
    return ss.SteeringVector({k: torch.randn(d, generator=g) for k in layers}, provenance=prov)


def test_use_record_survives_safetensors_and_gguf_round_trips_exactly(tmp_path):
    v = _vec()
    a = ss.SteeringVector.load(v.save(tmp_path / "v.safetensors"))
    assert a.provenance == v.provenance and a.provenance.use == USE
    g = ss.SteeringVector.load(a.export_gguf(tmp_path / "v.gguf"))
    assert g.provenance == v.provenance and g.site == v.site and g.layers == v.layers
    assert all(torch.equal(g[k], v[k]) for k in v.layers)
    b = ss.SteeringVector.load(g.save(tmp_path / "back.safetensors"))  # safetensors -> GGUF -> safetensors
    assert b.provenance == v.provenance and b.provenance.use.alpha == USE.alpha  # float64 in GGUF: no rounding
    post = ss.SteeringVector({3: torch.ones(8)}, "resid_post", ss.Provenance(use=Use(site="resid_post", layers=[3],
                                                                                     alpha=2.0)))
    back = ss.SteeringVector.load(post.export_gguf(tmp_path / "post.gguf"))
    assert back.site == "resid_post" and back.layers == [3] and back.provenance.use == post.provenance.use


def test_gguf_keys_are_namespaced_beside_llamacpp_ones(tmp_path):
    import gguf

    r = gguf.GGUFReader(str(_vec().export_gguf(tmp_path / "v.gguf")))
    ours = {k for k in r.fields if k.startswith("steerscope.")}
    assert {"steerscope.site", "steerscope.provenance", "steerscope.use.alpha", "steerscope.use.layers",
            "steerscope.use.positions", "steerscope.use.tuned_on"} <= ours
    assert r.fields["controlvector.model_hint"].contents() == "tiny"
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.2"]  # what llama.cpp reads, unchanged


def test_files_without_a_use_record_still_load(tmp_path):
    from safetensors.torch import save_file

    old = {"format_version": 1, "site": "resid_pre", "provenance": {"model": "m", "method": "dim"}}  # before issue 23
    save_file({"layer.4": torch.ones(8)}, str(tmp_path / "old.safetensors"), metadata={"steerscope": json.dumps(old)})
    v = ss.SteeringVector.load(tmp_path / "old.safetensors")
    assert v.provenance.use is None and v.provenance.method == "dim"
    bad = {**old, "provenance": {"use": {"operation": "shout", "layers": [4]}}}
    save_file({"layer.4": torch.ones(8)}, str(tmp_path / "bad.safetensors"), metadata={"steerscope": json.dumps(bad)})
    with pytest.raises(VectorError, match="use"):
        ss.SteeringVector.load(tmp_path / "bad.safetensors")


def test_derived_vectors_drop_a_recommendation_that_no_longer_fits():
    v = _vec()
    assert (2 * v).provenance.use is None and (v + v).provenance.use is None and v.normalize().provenance.use is None
    assert v.select([2]).provenance.use == USE and v.select([3]).provenance.use is None
    with pytest.raises(VectorError):
        Use(operation="add", alpha=float("nan"))
    from steerscope.backends.vllm import as_resid_pre

    post = ss.SteeringVector({1: torch.ones(8)}, "mlp_out", ss.Provenance(use=Use(site="mlp_out", layers=[1], alpha=2.0)))
    moved = as_resid_pre(post, n_layers=4)  # the same vector one layer up: its record follows it
    assert moved.provenance.use == Use(site="resid_pre", layers=[2], alpha=2.0)


def test_steering_without_alpha_uses_the_recommendation_bit_identically(one_thread):
    lm = tiny_lm()
    v = _vec(lm.d_model)
    enc = lm.tokenize([lm.format_chat("How do I bake bread?")])
    with torch.no_grad():
        with ss.steering(lm, v.select([2]), alpha=USE.alpha, positions="prompt"):
            explicit = lm.model(**enc).logits
        with pytest.warns(RecommendedAlpha, match="recommended alpha 1.235 at layers \\[2\\], positions 'prompt'"):
            with ss.steering(lm, v):  # restricted to the record's layer 2, its alpha and positions
                implicit = lm.model(**enc).logits
        base = lm.model(**enc).logits
    assert torch.equal(implicit, explicit) and not torch.equal(implicit, base)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RecommendedAlpha)
        with ss.steering(lm, v, positions="last-1"):  # an explicit scope wins over the record's
            other = lm.model(**enc).logits
    assert not torch.equal(other, explicit)


def test_steering_without_alpha_refuses_a_vector_without_a_recommendation(one_thread):
    lm = tiny_lm()
    with pytest.raises(VectorError, match="no recommended alpha.*steerscope tune"):
        with ss.steering(lm, _vec(lm.d_model, use=None)):
            pass
    with pytest.raises(VectorError, match="no recommended alpha"):
        with ss.steering(lm, [_vec(lm.d_model), _vec(lm.d_model)]):
            pass
    ablate = _vec(lm.d_model, use=Use(operation="ablate", layers=[2], alpha=1.0))
    with pytest.raises(VectorError, match="ablate"):
        with ss.steering(lm, ablate):
            pass


def test_inspect_shows_the_use_record(tmp_path, capsys):
    p = _vec().save(tmp_path / "v.safetensors")
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "use (how the file is meant to be applied):" in out and "alpha: 1.2345678901234567" in out
    assert "positions: prompt" in out and "tuned_on: 0123abcd" in out
    assert main(["inspect", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Use.from_dict(info["provenance"]["use"]) == USE
