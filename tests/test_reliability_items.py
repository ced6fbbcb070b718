"""Issue 15, items 5 and 7-10: numeric guards, escaped output, science guards, small edges, llama.cpp interop."""

from __future__ import annotations

import json
import os
import re
import time
import warnings

import numpy as np
import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.cli import main
from steerscope.control_vectors import write_control_vector
from steerscope.errors import DataError, SteerscopeError, VectorError


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    return make_tiny("llama", seed=3, tokenizer=smol_tokenizer)


def _vec(lm, layer: int = 1, scale: float = 1.0) -> ss.SteeringVector:
    torch.manual_seed(0)
    return ss.SteeringVector({layer: scale * torch.randn(lm.d_model)})


def _save_raw(path, tensors: dict, meta: str | None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=None if meta is None else {"steerscope": meta})


# -- 5: numeric guards --------------------------------------------------------------------------
def test_an_alpha_that_overflows_the_model_dtype_is_refused(tiny):
    with pytest.raises(VectorError, match="overflows"):
        ss.generate(tiny, ["Hi"], vector=_vec(tiny), alpha=1e39, max_new_tokens=2)


def test_a_vector_whose_norm_overflows_is_refused():
    with pytest.raises(VectorError, match="norm overflows"):
        ss.SteeringVector({1: torch.full((64,), 1e38)})


def test_nan_logits_stop_generation_with_a_clear_error(smol_tokenizer):
    lm = make_tiny("llama", seed=4, tokenizer=smol_tokenizer)
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(SteerscopeError, match="NaN/inf logits"):
        ss.generate(lm, ["Hi"], max_new_tokens=3)


def test_inspect_json_is_strict_even_with_infinite_metadata(tmp_path, capsys):
    meta = json.dumps({"site": "resid_pre", "provenance": {"args": {"x": float("inf")}, "n_examples": 3}})
    assert "Infinity" in meta
    _save_raw(tmp_path / "v.safetensors", {"layer.1": torch.ones(4)}, meta)
    assert main(["inspect", str(tmp_path / "v.safetensors"), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert info["provenance"]["args"]["x"] is None


def test_nan_study_options_are_refused(tmp_path, capsys):
    from steerscope.studies.identifiability.config import Config

    with pytest.raises(SteerscopeError, match="--alphas"):
        Config(alphas=(float("nan"),))
    rc = main(["study", "identifiability", "--out", str(tmp_path / "r"), "--alphas", "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "finite" in err[0]
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_huge_alpha_warns_against_the_residual_norm(tiny, tmp_path, capsys, monkeypatch):
    v = _vec(tiny)
    v.save(tmp_path / "v.safetensors")
    monkeypatch.setattr(ss, "load_model", lambda *a, **k: tiny)
    rc = main(["generate", "--vector", str(tmp_path / "v.safetensors"), "--alpha", "1e6", "--prompt", "Hi",
               "--max-new-tokens", "2", "--json"])
    err = capsys.readouterr().err
    assert rc == 0 and re.search(r"relative dose alpha\*\|v\|/\|resid\| is [0-9.e+]+x at alpha=1e\+06", err) and "degenerate" in err


# -- 7: escapes --------------------------------------------------------------------------------
def test_inspect_escapes_terminal_control_sequences(tmp_path, capsys):
    evil = "\x1b]0;pwned\x07\x1b[2J\nerror: forged line\r"
    meta = json.dumps({"site": "resid_pre", "provenance": {"model": evil, "method": "dim"}})
    _save_raw(tmp_path / "v.safetensors", {"layer.1": torch.ones(4)}, meta)
    assert main(["inspect", str(tmp_path / "v.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert not any(line.startswith("error:") for line in out.splitlines())
    assert "\\x1b]0;pwned" in out


# -- 8: science guards ------------------------------------------------------------------------
def test_identifiability_withholds_the_verdict_at_tiny_n():
    from steerscope.studies.identifiability import steps
    from steerscope.studies.identifiability.config import Config

    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0,))
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 2)
    scores = {"formality|none|0|neutral": {"probe": {"none@0": list(base)}},
              "formality|dim|0|neutral": {"probe": {"v@4": list(base + 3), "v+v_perp@4": list(base + 3.01),
                                                    "v_perp@4": list(base)}}}
    (r,) = steps.effects(cfg, scores, {"formality": "probe"}, {"formality": {"probe": True}})
    assert r.verdict.startswith("withheld") and "equivalent" not in r.verdict


def test_identical_contrast_sets_warn_of_a_zero_vector(tiny):
    prompts = ["Write a letter.", "Describe a cat."]
    with pytest.warns(UserWarning, match="zero vector"):
        ss.extract(tiny, prompts, list(prompts), layers=[1])


# -- 9: smaller edges -------------------------------------------------------------------------
def _write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    write_control_vector(path, tensors)


def test_a_2d_gguf_direction_and_float_layer_keys_are_refused(tmp_path):
    _write_gguf(tmp_path / "cv.gguf", {"direction.1": np.ones((2, 8))})
    with pytest.raises(VectorError, match="1-D"):
        ss.SteeringVector.load(tmp_path / "cv.gguf")
    with pytest.raises(VectorError, match="integer"):
        ss.SteeringVector({1.5: torch.ones(4)})


def test_fingerprint_does_not_depend_on_the_dtype(smol_tokenizer):
    a = make_tiny("llama", seed=7, tokenizer=smol_tokenizer)
    b = make_tiny("llama", seed=7, tokenizer=smol_tokenizer)
    b.model.to(torch.bfloat16)
    v = ss.SteeringVector({1: torch.randn(a.d_model)}, provenance=ss.Provenance.for_model(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v.check_compatible(b)
    assert a.fingerprint == b.fingerprint


def test_a_prompt_longer_than_the_context_fails_before_generating(tiny):
    n_ctx = tiny.model.config.max_position_embeddings
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="context"):
        ss.generate(tiny, ["word " * (n_ctx + 10)], max_new_tokens=2)
    assert time.perf_counter() - t0 < 10


def test_bad_vector_positions_and_method_are_found_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(ss, "load_model", boom)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    (tmp_path / "p.txt").write_text("a\nb\n")
    cases = [["generate", "--vector", str(tmp_path / "bad.safetensors")],
             ["generate", "--positions", "abc"],
             ["extract", "--positive", str(tmp_path / "p.txt"), "--negative", str(tmp_path / "p.txt"),
              "--method", "nosuch", "--out", str(tmp_path / "v.safetensors")]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)


def test_a_model_name_that_is_no_folder_fails_at_once_without_a_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ss.SteerscopeError, match="no folder named 'my-model'.*unreachable"):
        ss.load_model("my-model")
    assert time.perf_counter() - t0 < 5


def test_a_folder_with_only_pickle_weights_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ss.SteerscopeError, match="safetensors only") as e:
        ss.load_model(str(tmp_path))
    assert "weights_only" not in str(e.value)


# -- 10: llama.cpp layer mapping --------------------------------------------------------------
def test_export_refuses_layers_that_map_to_direction_0(tmp_path):
    with pytest.raises(VectorError, match="direction.0"):
        ss.SteeringVector({1: torch.ones(8), 3: torch.ones(8)}).export_gguf(tmp_path / "a.gguf")
    with pytest.raises(VectorError, match="direction.0"):
        ss.SteeringVector({0: torch.ones(8)}, site="resid_post").export_gguf(tmp_path / "b.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_import_maps_the_last_direction_to_resid_post(tmp_path, tiny):
    n = tiny.n_layers
    _write_gguf(tmp_path / "cv.gguf", {f"direction.{k}": np.full(tiny.d_model, float(k)) for k in (1, n - 1)})
    v = ss.SteeringVector.load(tmp_path / "cv.gguf", n_layers=n)
    assert v.site == "resid_post" and v.layers == [1, n - 1]
    v.check_compatible(tiny)
    old = ss.SteeringVector.load(tmp_path / "cv.gguf")  # without the model's depth: resid_pre N+1
    assert old.site == "resid_pre" and old.layers == [2, n]
    with pytest.raises(VectorError, match="n_layers"):
        old.check_compatible(tiny)
    batch = tiny.tokenize([tiny.format_chat("Hello there")])
    outs = []
    for vec in (v, ss.SteeringVector({2: v[1]})):
        with torch.no_grad(), ss.steering(tiny, vec.select([vec.layers[0]]), alpha=2.0):
            outs.append(tiny.model(**batch).logits)
    torch.testing.assert_close(outs[0], outs[1])  # resid_post 1 is resid_pre 2


def _llamacpp_ready() -> bool:
    import importlib.util

    has_lib = bool(os.environ.get("STEERSCOPE_LLAMACPP")) or importlib.util.find_spec("llama_cpp") is not None
    has_model = bool(os.environ.get("STEERSCOPE_F32_GGUF") or os.environ.get("LLAMACPP_CONVERT"))
    return has_lib and has_model


@pytest.mark.slow
@pytest.mark.skipif(not _llamacpp_ready(), reason="needs llama_cpp (or STEERSCOPE_LLAMACPP=<python with it>) and "
                    "STEERSCOPE_F32_GGUF (an F32 GGUF of SmolLM2-135M) or LLAMACPP_CONVERT (convert_hf_to_gguf.py)")
def test_llama_cpp_agrees_with_the_hf_path():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_llamacpp.py"
    py = os.environ.get("STEERSCOPE_LLAMACPP") or sys.executable
    res = subprocess.run([sys.executable, str(script), "--json", "--quick", "--llama-python", py],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(Path(ss.__file__).resolve().parents[1])})
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["tokens_identical"] == rep["n_prompts"] and rep["delta_rel_err"] < 0.02
    assert rep["delta_rel_err_off_by_one"] > 5 * rep["delta_rel_err"]
    assert rep["direction0_refused"]
