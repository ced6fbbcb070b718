"""Hostile-user fuzz suite (issue 15): every bad input gives one ``error:`` line, a non-zero exit
(2 for user errors), no traceback, and nothing in a run folder is lost.

Most cases call ``cli.main`` in-process (fast); a few run the console entry point in a subprocess to
check that no traceback ever reaches the terminal. Hypothesis draws random bytes, metadata and
argument strings for the properties at the end.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import steerscope as ss
from conftest import make_tiny
from steerscope.cli import main
from steerscope.control_vectors import write_control_vector
from steerscope.errors import SteerscopeError, VectorError
from steerscope.runs import Run

SRC = str(Path(ss.__file__).resolve().parents[1])


def _one_error(capsys, rc: int, code: int = 2) -> str:
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.strip().splitlines() if ln.strip()]
    assert rc == code, (rc, cap.err)
    assert "Traceback" not in cap.err, cap.err
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress bars may precede; one error line last
    return errors[0]


def _raw(path: Path, tensors: dict, meta: str | None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=None if meta is None else {"steerscope": meta})
    return path


def _gguf(path, tensors: dict[str, np.ndarray]) -> Path:
    return write_control_vector(path, tensors)


ONE = {"layer.1": torch.ones(64)}
META = json.dumps({"site": "resid_pre", "provenance": {}})

# name -> builder(tmp) returning the vector path; every one must be refused by `inspect`
BAD_VECTORS = {
    "missing": lambda d: d / "nope.safetensors",
    "junk_bytes": lambda d: (d / "j.safetensors").write_bytes(b"\x00junk" * 9) and d / "j.safetensors",
    "empty_file": lambda d: (d / "e.safetensors").write_bytes(b"") or d / "e.safetensors",
    "no_metadata": lambda d: _raw(d / "a.safetensors", ONE, None),
    "meta_list": lambda d: _raw(d / "a.safetensors", ONE, "[1, 2]"),
    "meta_string": lambda d: _raw(d / "a.safetensors", ONE, '"hello"'),
    "meta_null": lambda d: _raw(d / "a.safetensors", ONE, "null"),
    "meta_not_json": lambda d: _raw(d / "a.safetensors", ONE, "{not json"),
    "provenance_list": lambda d: _raw(d / "a.safetensors", ONE, '{"provenance": [1]}'),
    "provenance_unknown_field": lambda d: _raw(d / "a.safetensors", ONE, '{"provenance": {"evil": 1}}'),
    "provenance_args_string": lambda d: _raw(d / "a.safetensors", ONE, '{"provenance": {"args": "x"}}'),
    "site_number": lambda d: _raw(d / "a.safetensors", ONE, '{"site": 5}'),
    "site_unknown": lambda d: _raw(d / "a.safetensors", ONE, '{"site": "resid_foo"}'),
    "layer_abc": lambda d: _raw(d / "a.safetensors", {"layer.abc": torch.ones(4)}, META),
    "layer_float": lambda d: _raw(d / "a.safetensors", {"layer.1.5": torch.ones(4)}, META),
    "layer_negative": lambda d: _raw(d / "a.safetensors", {"layer.-1": torch.ones(4)}, META),
    "no_layers": lambda d: _raw(d / "a.safetensors", {"other": torch.ones(4)}, META),
    "two_d": lambda d: _raw(d / "a.safetensors", {"layer.1": torch.ones(2, 4)}, META),
    "nan": lambda d: _raw(d / "a.safetensors", {"layer.1": torch.tensor([1.0, float("nan")])}, META),
    "inf": lambda d: _raw(d / "a.safetensors", {"layer.1": torch.tensor([1.0, float("inf")])}, META),
    "norm_overflow": lambda d: _raw(d / "a.safetensors", {"layer.1": torch.full((64,), 1e38)}, META),
    "mixed_sizes": lambda d: _raw(d / "a.safetensors", {"layer.1": torch.ones(4), "layer.2": torch.ones(5)}, META),
    "pickle_named_pt": lambda d: (d / "v.pt").write_bytes(b"\x80\x04K\x01.") and d / "v.pt",
    "folder": lambda d: (d / "dir.safetensors").mkdir() or d / "dir.safetensors",
    "unknown_shipped_name": lambda d: Path("nosuch-model/nosuch-vector"),
    "gguf_junk": lambda d: (d / "a.gguf").write_bytes(b"GGUFjunk") and d / "a.gguf",
    "gguf_direction_abc": lambda d: _gguf(d / "a.gguf", {"direction.abc": np.ones(8)}),
    "gguf_two_d": lambda d: _gguf(d / "a.gguf", {"direction.2": np.ones((2, 8))}),
    "gguf_no_directions": lambda d: _gguf(d / "a.gguf", {"weight": np.ones(8)}),
    "gguf_nan": lambda d: _gguf(d / "a.gguf", {"direction.2": np.array([1.0, np.nan])}),
    # metadata JSON nested past the parser's stack, nested past any provenance's shape, or huge (issue 26)
    "meta_nested_100k": lambda d: _raw(d / "a.safetensors", ONE, '{"provenance": {"args": {"x": ' + "[" * 100_000
                                       + "]" * 100_000 + "}}}"),
    "meta_nested_500": lambda d: _raw(d / "a.safetensors", ONE, '{"provenance": {"args": {"x": ' + "[" * 500
                                      + "]" * 500 + "}}}"),
    "meta_huge": lambda d: _raw(d / "a.safetensors", ONE, json.dumps({"provenance": {"args": {"x": "y" * (2 << 20)}}})),
    "meta_huge_int": lambda d: _raw(d / "a.safetensors", ONE, '{"provenance": {"n_examples": 1' + "0" * 5000 + "}}"),
}


@pytest.mark.parametrize("case", sorted(BAD_VECTORS))
def test_inspect_refuses_a_bad_vector_in_one_line(case, tmp_path, capsys):
    path = BAD_VECTORS[case](tmp_path)
    _one_error(capsys, main(["inspect", str(path)]))


@pytest.mark.parametrize("case", ["meta_nested_100k", "meta_nested_500", "meta_huge", "meta_huge_int"])
def test_loading_a_vector_with_deep_or_huge_metadata_is_a_vector_error(case, tmp_path):
    with pytest.raises(VectorError):
        ss.SteeringVector.load(BAD_VECTORS[case](tmp_path))


CORRUPT_CONFIGS = {  # config.json of a run folder, read by --report-only (issue 26)
    "truncated": '{"seed": ',
    "nested_100k": "[" * 100_000 + "]" * 100_000,
    "deep_object": '{"seed": ' + "[" * 100_000,
    "list": "[1, 2]",
    "not_utf8": "\udcff",
    "wrong_type": '{"traits": 5}',
}


@pytest.mark.parametrize("study", ["identifiability", "reasoning", "refusal", "refusal-mechanisms"])
@pytest.mark.parametrize("case", sorted(CORRUPT_CONFIGS))
def test_report_only_on_a_corrupt_config_json_is_one_line(case, study, tmp_path, no_model, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(CORRUPT_CONFIGS[case].encode("utf-8", "surrogateescape"))
    _one_error(capsys, main(["study", study, "--out", str(out), "--report-only"]))


def test_inspect_compare_with_another_size_is_one_line(tmp_path, capsys):
    ss.SteeringVector({1: torch.ones(4)}).save(tmp_path / "a.safetensors")
    ss.SteeringVector({1: torch.ones(5)}).save(tmp_path / "b.safetensors")
    _one_error(capsys, main(["inspect", str(tmp_path / "a.safetensors"), "--compare", str(tmp_path / "b.safetensors")]))


# -- argument errors: all found before any model is loaded -----------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded for an invalid command")

    monkeypatch.setattr(ss, "load_model", boom)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzdata")
    (d / "ok.txt").write_text("Write a formal letter.\nCompose an official memo.\n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "numbers.jsonl").write_text("1\n2\n")
    (d / "lists.jsonl").write_text("[1, 2]\n")
    (d / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (d / "number.json").write_text("42")
    (d / "badfield.jsonl").write_text('{"prompt": 5}\n')
    (d / "nofield.jsonl").write_text('{"foo": "bar"}\n')
    (d / "empty.txt").write_text("\n\n")
    (d / "data.xml").write_text("<a/>")
    ss.SteeringVector({1: torch.ones(64)}).save(d / "v.safetensors")
    (d / "junk.safetensors").write_bytes(b"junk")
    ss.SteeringVector({1: torch.ones(64)}, site="resid_post").save(d / "post.safetensors")
    ss.SteeringVector({1: torch.zeros(64)}).save(d / "zero.safetensors")
    _gguf(d / "abc.gguf", {"direction.abc": np.ones(8)})
    return d


GEN_ARGS = {
    "max_new_tokens_0": ["--max-new-tokens", "0"],
    "max_new_tokens_negative": ["--max-new-tokens", "-3"],
    "max_new_tokens_text": ["--max-new-tokens", "abc"],
    "alpha_nan": ["--alpha", "nan"],
    "alpha_inf": ["--alpha=-inf"],
    "alpha_text": ["--alpha", "abc"],
    "alpha_empty": ["--alpha", ","],
    "positions_text": ["--positions", "abc"],
    "positions_last_x": ["--positions", "last-x"],
    "device_tpu9": ["--device", "tpu9"],
    "layers_comma": ["--layers", ","],
    "layers_negative": ["--layers=-1"],
    "layers_text": ["--layers", "a,b"],
    "seed_text": ["--seed", "abc"],
    "unknown_option": ["--bogus"],
    "vector_junk": ["--vector", "{d}/junk.safetensors"],
    "vector_missing": ["--vector", "{d}/missing.safetensors"],
    "vector_layer_not_in_it": ["--vector", "{d}/v.safetensors", "--layers", "3"],
}


@pytest.mark.parametrize("case", sorted(GEN_ARGS))
def test_generate_rejects_bad_arguments_before_loading(case, files, no_model, capsys):
    argv = [a.format(d=files) for a in GEN_ARGS[case]]
    _one_error(capsys, main(["generate", *argv]))


EXTRACT_ARGS = {
    "layers_comma": ["--layers", ","],
    "positions_text": ["--positions", "abc"],
    "positions_empty": ["--positions", ""],
    "batch_size_0": ["--batch-size", "0"],
    "method_unknown": ["--method", "nosuch"],
    "positive_missing": ["--positive", "{d}/missing.txt"],
    "positive_not_utf8": ["--positive", "{d}/latin1.txt"],
    "jsonl_numbers": ["--positive", "{d}/numbers.jsonl"],
    "jsonl_lists": ["--positive", "{d}/lists.jsonl"],
    "jsonl_broken": ["--positive", "{d}/broken.jsonl"],
    "json_number": ["--positive", "{d}/number.json"],
    "field_not_string": ["--positive", "{d}/badfield.jsonl"],
    "no_text_field": ["--positive", "{d}/nofield.jsonl"],
    "empty_file": ["--positive", "{d}/empty.txt"],
    "unsupported_type": ["--positive", "{d}/data.xml"],
    "positive_is_folder": ["--positive", "{d}"],
    "out_is_folder": ["--out", "{d}"],
    "out_unwritable": ["--out", "/proc/steerscope-test/v.safetensors"],
    "device_bad": ["--device", "gpu"],
}


@pytest.mark.parametrize("case", sorted(EXTRACT_ARGS))
def test_extract_rejects_bad_input_before_loading(case, files, no_model, capsys, tmp_path):
    base = {"--positive": f"{files}/ok.txt", "--negative": f"{files}/ok.txt", "--out": str(tmp_path / "v.safetensors")}
    extra = [a.format(d=files) for a in EXTRACT_ARGS[case]]
    for k in list(base):
        if k in extra:
            del base[k]
    argv = ["extract", *[x for kv in base.items() for x in kv], *extra]
    _one_error(capsys, main(argv))
    assert not (tmp_path / "v.safetensors").exists()


STUDY_ARGS = {
    "alphas_nan": ["identifiability", "--alphas", "nan"],
    "alphas_inf": ["identifiability", "--alphas", "inf,2"],
    "alphas_text": ["identifiability", "--alphas", "a,b"],
    "alphas_zero": ["identifiability", "--alphas", "0"],
    "n_prompts_0": ["identifiability", "--n-prompts", "0"],
    "n_prompts_text": ["identifiability", "--n-prompts", "x"],
    "seeds_text": ["identifiability", "--seeds", "a"],
    "traits_unknown": ["identifiability", "--traits", "humour"],
    "temperature_nan": ["identifiability", "--temperature", "nan"],
    "unknown_study": ["nosuch"],
    "device_bad": ["identifiability", "--device", "tpu9"],
}

# sizes and magnitudes of the refusal studies, refused before the run folder or a model is touched
REFUSAL_STUDY_ARGS = {
    "refusal_n_test_0": ["refusal", "--n-test", "0"],
    "refusal_tokens_negative": ["refusal", "--max-new-tokens", "-4"],
    "refusal_alphas_nan": ["refusal", "--alphas", "nan"],
    "refusal_alphas_negative": ["refusal", "--alphas", "-1"],
    "refusal_select_alphas_zero": ["refusal", "--select-alphas", "0"],
    "mechanisms_n_eval_negative": ["refusal-mechanisms", "--n-eval", "-3"],
    "mechanisms_n_ablate_negative": ["refusal-mechanisms", "--n-ablate", "-1"],
    "mechanisms_eval_tokens_0": ["refusal-mechanisms", "--eval-tokens", "0"],
}


@pytest.mark.parametrize("case", sorted(REFUSAL_STUDY_ARGS))
def test_refusal_studies_reject_bad_sizes_before_the_run_folder(case, tmp_path, no_model, capsys, monkeypatch):
    from steerscope.studies.refusal import steps as refusal_steps

    monkeypatch.setattr(refusal_steps, "load_model", ss.load_model)  # the no_model stand-in
    study, option, value = REFUSAL_STUDY_ARGS[case]
    out = tmp_path / "run"
    line = _one_error(capsys, main(["study", study, "--out", str(out), option, value]))
    assert option in line and not out.exists(), line


@pytest.mark.parametrize("case", sorted(STUDY_ARGS))
def test_study_rejects_bad_options_and_keeps_the_run_folder(case, tmp_path, no_model, capsys):
    out = tmp_path / "run"
    with Run(out, config={"kept": True}) as run:
        run.step("s", lambda: {"x": 1})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _one_error(capsys, main(["study", *STUDY_ARGS[case][:1], "--out", str(out), *STUDY_ARGS[case][1:]]))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_study_out_that_is_a_file_or_unwritable_is_refused(tmp_path, no_model, capsys):
    (tmp_path / "f").write_text("keep me")
    _one_error(capsys, main(["study", "identifiability", "--out", str(tmp_path / "f")]))
    assert (tmp_path / "f").read_text() == "keep me"
    _one_error(capsys, main(["study", "identifiability", "--out", "/proc/steerscope-run"]))


def test_a_study_on_a_folder_in_use_is_refused_in_one_line(tmp_path, capsys):
    code = f"from steerscope.runs import Run; import time; r = Run({str(tmp_path / 'run')!r}); " \
           "print('ready', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        line = _one_error(capsys, main(["study", "identifiability", "--out", str(tmp_path / "run")]))
        assert f"process {p.pid}" in line
    finally:
        p.kill()
        p.wait()


EXPLAIN_ARGS = {  # [vector, *options]; every one is refused before the model loads
    "vector_missing": ["{d}/missing.safetensors"],
    "vector_junk": ["{d}/junk.safetensors"],
    "vector_unknown_shipped_name": ["nosuch-model/nosuch-vector"],
    "vector_gguf_direction_abc": ["{d}/abc.gguf"],
    "vector_resid_post": ["{d}/post.safetensors"],
    "vector_zero": ["{d}/zero.safetensors"],
    "alpha_nan": ["{d}/v.safetensors", "--alpha", "nan"],
    "alpha_inf": ["{d}/v.safetensors", "--alpha=-inf"],
    "alpha_text": ["{d}/v.safetensors", "--alpha", "abc"],
    "alpha_overflow": ["{d}/v.safetensors", "--alpha", "1e39"],
    "alpha_zero": ["{d}/v.safetensors", "--alpha", "0"],
    "scorer_bogus": ["{d}/v.safetensors", "--scorer", "bogus"],
    "prompts_missing": ["{d}/v.safetensors", "--prompts", "{d}/missing.txt"],
    "prompts_not_utf8": ["{d}/v.safetensors", "--prompts", "{d}/latin1.txt"],
    "prompts_empty": ["{d}/v.safetensors", "--prompts", "{d}/empty.txt"],
    "prompts_jsonl_numbers": ["{d}/v.safetensors", "--prompts", "{d}/numbers.jsonl"],
    "prompts_folder": ["{d}/v.safetensors", "--prompts", "{d}"],
    "prompts_xml": ["{d}/v.safetensors", "--prompts", "{d}/data.xml"],
    "layer_not_in_vector": ["{d}/v.safetensors", "--layer", "3"],
    "layer_negative": ["{d}/v.safetensors", "--layer=-1"],
    "layer_text": ["{d}/v.safetensors", "--layer", "x"],
    "out_is_a_file": ["{d}/v.safetensors", "--out", "{d}/ok.txt"],
    "out_unwritable": ["{d}/v.safetensors", "--out", "/proc/steerscope-card"],
    "device_bad": ["{d}/v.safetensors", "--device", "tpu9"],
    "unknown_option": ["{d}/v.safetensors", "--bogus"],
}


@pytest.mark.parametrize("case", sorted(EXPLAIN_ARGS))
def test_explain_rejects_bad_input_before_loading(case, files, no_model, capsys, tmp_path):
    argv = [a.format(d=files) for a in EXPLAIN_ARGS[case]]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "card")]
    before = (files / "ok.txt").read_bytes()
    _one_error(capsys, main(["explain", *argv, *out]))
    assert not (tmp_path / "card").exists() and (files / "ok.txt").read_bytes() == before


def test_explain_on_a_folder_in_use_is_refused_before_loading(tmp_path, files, no_model, capsys):
    code = f"from steerscope.runs import Run; import time; r = Run({str(tmp_path / 'card')!r}); " \
           "print('ready', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        line = _one_error(capsys, main(["explain", f"{files}/v.safetensors", "--out", str(tmp_path / "card")]))
        assert f"process {p.pid}" in line
    finally:
        p.kill()
        p.wait()


SERVE_ARGS = {  # refused before the engine check, the model load and any engine start
    "vectors_no_equals": ["--vectors", "formal"],
    "vectors_no_name": ["--vectors", "={d}/v.safetensors"],
    "vectors_no_path": ["--vectors", "formal="],
    "vectors_a_b_c": ["--vectors", "a=b=c"],
    "vectors_duplicate_name": ["--vectors", "a={d}/v.safetensors,a={d}/v.safetensors"],
    "vectors_bad_name": ["--vectors", "a b={d}/v.safetensors"],
    "vectors_missing_file": ["--vectors", "a={d}/missing.safetensors"],
    "vectors_folder": ["--vectors", "a={d}"],
    "vectors_corrupt_file": ["--vectors", "a={d}/junk.safetensors"],
    "vectors_resid_post": ["--vectors", "a={d}/post.safetensors"],
    "port_0": ["--port", "0"],
    "port_70000": ["--port", "70000"],
    "port_text": ["--port", "abc"],
    "host_bad": ["--host", "not a host!"],
    "host_empty": ["--host", ""],
    "device_bad": ["--device", "tpu9"],
    "vllm_args_unclosed_quote": ["--vllm-args", "--max-model-len '2048"],
    "vllm_args_set_by_steerscope": ["--vllm-args", "--port 9000"],
}


@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """No engine environment, and any engine start or weight export fails the test."""
    from steerscope.backends import serve, vllm

    def boom(*a, **k):
        raise AssertionError("the engine was started for an invalid command")

    monkeypatch.setenv("STEERSCOPE_VLLM_ENV", str(tmp_path / "no-engine"))
    monkeypatch.setattr(serve.os, "execve", boom)
    monkeypatch.setattr(vllm, "export_folder", boom)


@pytest.mark.parametrize("case", sorted(SERVE_ARGS))
def test_serve_rejects_bad_arguments_before_the_engine(case, files, no_model, no_engine, capsys):
    argv = [a.format(d=files) for a in SERVE_ARGS[case]]
    line = _one_error(capsys, main(["serve", "smollm2-135m", *argv]))
    assert "vllm-setup" not in line, line  # the argument's own error, not the missing engine


TOP_LEVEL = {"no_command": [], "unknown_command": ["frobnicate"], "bad_subcommand_option": ["inspect"]}


@pytest.mark.parametrize("case", sorted(TOP_LEVEL))
def test_top_level_usage_errors_are_one_line(case, capsys):
    _one_error(capsys, main(TOP_LEVEL[case]))


# -- model folders and names --------------------------------------------------------------------
MODEL_SOURCES = {
    "empty_folder": lambda d: (d / "m").mkdir() or d / "m",
    "pickle_only_folder": lambda d: _pickle_folder(d),
    "missing_absolute": lambda d: Path("/nonexistent/model"),
    "missing_gguf": lambda d: d / "m.gguf",
    "plain_file": lambda d: (d / "m.txt").write_text("x") and d / "m.txt",
    "relative_name_offline": lambda d: Path("my-local-model"),
    "invalid_hub_id": lambda d: Path("a b c!"),
}


def _pickle_folder(d: Path) -> Path:
    (d / "m").mkdir()
    (d / "m" / "config.json").write_text('{"model_type": "llama"}')
    (d / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return d / "m"


@pytest.mark.parametrize("case", sorted(MODEL_SOURCES))
def test_generate_with_a_bad_model_source_is_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    src = MODEL_SOURCES[case](tmp_path)
    line = _one_error(capsys, main(["generate", "--model", str(src), "--max-new-tokens", "1"]))
    assert "weights_only" not in line


# -- with a (tiny) model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    return make_tiny("llama", seed=11, tokenizer=smol_tokenizer)


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    monkeypatch.setattr(ss, "load_model", lambda *a, **k: tiny)
    return tiny


def test_generate_overflowing_alpha_is_one_line(use_tiny, files, capsys):
    _one_error(capsys, main(["generate", "--vector", f"{files}/v.safetensors", "--alpha", "1e39", "--prompt", "Hi"]))


def test_generate_vector_out_of_range_or_wrong_size_is_one_line(use_tiny, tmp_path, capsys):
    ss.SteeringVector({9: torch.ones(64)}).save(tmp_path / "far.safetensors")
    _one_error(capsys, main(["generate", "--vector", str(tmp_path / "far.safetensors"), "--prompt", "Hi"]))
    ss.SteeringVector({1: torch.ones(65)}).save(tmp_path / "wide.safetensors")
    _one_error(capsys, main(["generate", "--vector", str(tmp_path / "wide.safetensors"), "--prompt", "Hi"]))


def test_generate_prompt_beyond_the_context_is_one_line(use_tiny, capsys):
    _one_error(capsys, main(["generate", "--prompt", "word " * 400, "--max-new-tokens", "2"]))


def test_extract_layer_out_of_range_is_one_line(use_tiny, files, tmp_path, capsys):
    _one_error(capsys, main(["extract", "--positive", f"{files}/ok.txt", "--negative", f"{files}/ok.txt",
                             "--layers", "7", "--out", str(tmp_path / "v.safetensors")]))


def test_explain_vector_of_another_size_or_depth_is_one_line(use_tiny, tmp_path, capsys):
    for name, vec in {"wide": ss.SteeringVector({1: torch.ones(65)}), "far": ss.SteeringVector({9: torch.ones(64)})}.items():
        vec.save(tmp_path / f"{name}.safetensors")
        _one_error(capsys, main(["explain", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name)]))


def test_explain_on_a_folder_of_another_run_is_one_line_and_keeps_it(use_tiny, files, tmp_path, capsys):
    with Run(tmp_path / "card", config={"other": True}) as run:
        run.step("vector", lambda: {"x": 1})
    before = {p: p.read_bytes() for p in (tmp_path / "card").rglob("*") if p.is_file() and p.name != ".lock"}
    _one_error(capsys, main(["explain", f"{files}/v.safetensors", "--out", str(tmp_path / "card")]))
    assert {p: p.read_bytes() for p in (tmp_path / "card").rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_explain_prompt_beyond_the_context_is_one_line(use_tiny, files, tmp_path, capsys):
    (tmp_path / "long.txt").write_text("word " * 400)
    _one_error(capsys, main(["explain", f"{files}/v.safetensors", "--prompts", str(tmp_path / "long.txt"),
                             "--out", str(tmp_path / "card")]))


def test_explain_recomputes_a_corrupt_card_record_and_keeps_the_others(use_tiny, files, tmp_path, capfd):
    (tmp_path / "p.txt").write_text("Write a formal letter.\nCompose an official memo.\n")
    argv = ["explain", f"{files}/v.safetensors", "--prompts", str(tmp_path / "p.txt"), "--alpha", "2", "--quick",
            "--out", str(tmp_path / "card"), "--json"]
    assert main(argv) == 0
    first = json.loads(capfd.readouterr().out)
    steps = tmp_path / "card" / "steps"
    kept = {p.name: p.read_bytes() for p in steps.glob("*.json") if p.name != "lens.json"}
    (steps / "lens.json").write_bytes(b"{\"top\": [1, 2")
    assert main(argv) == 0
    cap = capfd.readouterr()
    warnings = [ln for ln in cap.err.splitlines() if ln.startswith("warning:") and "record" in ln]  # (not the dose warning)
    assert len(warnings) == 1 and "lens" in warnings[0] and "error:" not in cap.err, cap.err
    again = json.loads(cap.out)
    assert again["vector"].pop("timings").keys() == first["vector"].pop("timings").keys()  # lens: new timing
    assert again == first
    assert {p.name: p.read_bytes() for p in steps.glob("*.json") if p.name != "lens.json"} == kept


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    """An engine environment that exists (a stub python); starting it or exporting weights fails the test."""
    from steerscope.backends import serve, vllm

    def boom(*a, **k):
        raise AssertionError("the engine was started with an incompatible vector")

    (tmp_path / "env" / "bin").mkdir(parents=True)
    (tmp_path / "env" / "bin" / "python").write_text("")
    monkeypatch.setenv("STEERSCOPE_VLLM_ENV", str(tmp_path / "env"))
    monkeypatch.setattr(serve.os, "execve", boom)
    monkeypatch.setattr(vllm, "export_folder", boom)


@pytest.mark.parametrize("vec", [{1: torch.ones(65)}, {9: torch.ones(64)}], ids=["other_d_model", "other_depth"])
def test_serve_vector_that_does_not_fit_the_model_is_one_line(vec, use_tiny, fake_engine, tmp_path, capsys):
    ss.SteeringVector(vec).save(tmp_path / "v.safetensors")
    _one_error(capsys, main(["serve", "tiny", "--vectors", f"a={tmp_path}/v.safetensors"]))


# -- the Python API ---------------------------------------------------------------------------
API = {
    "float_layer_key": lambda: ss.SteeringVector({1.5: torch.ones(4)}),
    "bool_layer_key": lambda: ss.SteeringVector({True: torch.ones(4)}),
    "string_layer_key": lambda: ss.SteeringVector({"1": torch.ones(4)}),
    "empty_vector": lambda: ss.SteeringVector({}),
    "export_resid_pre_1": lambda: ss.SteeringVector({1: torch.ones(4)}).export_gguf("/tmp/never.gguf"),
    "export_resid_post_0": lambda: ss.SteeringVector({0: torch.ones(4)}, site="resid_post").export_gguf("/tmp/x.gguf"),
    "normalize_zero": lambda: ss.SteeringVector({1: torch.zeros(4)}).normalize(),
    "cosine_no_shared": lambda: ss.SteeringVector({1: torch.ones(4)}).cosine(ss.SteeringVector({2: torch.ones(4)})),
}


@pytest.mark.parametrize("case", sorted(API))
def test_the_api_raises_a_steerscope_error(case):
    with pytest.raises(SteerscopeError) as e:
        API[case]()
    assert "\n" not in str(e.value)


def test_api_steering_with_nan_alpha_is_a_vector_error(tiny):
    with pytest.raises(VectorError):
        with ss.steering(tiny, ss.SteeringVector({1: torch.ones(64)}), alpha=float("nan")):
            pass


# -- properties (hypothesis) ------------------------------------------------------------------
_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_a_vector_file_are_one_line(tmp_path, capsys, data):
    p = tmp_path / "r.safetensors"
    p.write_bytes(data)
    _one_error(capsys, main(["inspect", str(p)]))


_json = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)


@_SETTINGS
@given(_json)
def test_random_metadata_loads_or_fails_in_one_line_and_never_prints_bad_json(tmp_path, capsys, meta):
    p = _raw(tmp_path / "m.safetensors", ONE, json.dumps(meta))
    rc = main(["inspect", str(p), "--json"])
    if rc == 0:
        json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    else:
        _one_error(capsys, rc)


@_SETTINGS
@given(st.text(max_size=12))
def test_random_layer_position_and_alpha_strings_never_crash(capsys, s):
    from steerscope import _cliargs as T

    for parse in (T.layer_list, T.int_positions, T.steer_positions, T.positive_int, T.finite_float):
        try:
            parse(s)
        except Exception as e:
            assert type(e).__name__ == "ArgumentTypeError", (parse.__name__, s, e)


@_SETTINGS
@given(st.binary(max_size=200))
def test_a_randomly_damaged_record_is_recomputed_never_crashes(tmp_path, capfd, junk):
    with Run(tmp_path / "r", config={"a": 1}) as run:
        run.step("s", lambda: {"x": [1, 2, 3]})
    (tmp_path / "r" / "steps" / "s.json").write_bytes(junk)
    with Run(tmp_path / "r", config={"a": 1}) as run:
        assert run.step("s", lambda: {"x": [1, 2, 3]})["x"] == [1, 2, 3]
    capfd.readouterr()


# -- subprocess: no traceback ever reaches the terminal -----------------------------------------
SUBPROCESS = {
    "inspect_junk": ["inspect", "{d}/junk.safetensors"],
    "generate_bad_tokens": ["generate", "--max-new-tokens", "0"],
    "extract_not_utf8": ["extract", "--positive", "{d}/latin1.txt", "--negative", "{d}/ok.txt", "--out", "{d}/x.st"],
    "study_alphas_nan": ["study", "identifiability", "--alphas", "nan", "--out", "{d}/run"],
    "no_command": [],
    "explain_junk_vector": ["explain", "{d}/junk.safetensors", "--out", "{d}/card"],
    "serve_bad_port": ["serve", "smollm2-135m", "--port", "70000"],
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_console_script_prints_one_line_and_no_traceback(case, files):
    argv = [a.format(d=files) for a in SUBPROCESS[case]]
    res = subprocess.run([sys.executable, "-m", "steerscope.cli", *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:"), res.stderr


# -- issue 26, item 5: prompt files ---------------------------------------------------------------
def test_txt_prompts_split_only_at_newlines(tmp_path) -> None:
    from steerscope.data import read_records

    p = tmp_path / "p.txt"
    p.write_bytes("one\x0cstill one\x1eand\u2028one\r\ntwo\n".encode())
    assert read_records(p) == ["one\x0cstill one\x1eand\u2028one", "two"]


@pytest.mark.parametrize("line", ['{"prompt": "\\ud800"}', "[" * 100_000 + "]" * 100_000],
                         ids=["lone-surrogate", "deep-nesting"])
def test_a_bad_jsonl_prompt_line_is_one_data_error(tmp_path, line) -> None:
    from steerscope.data import read_jsonl
    from steerscope.errors import DataError

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2 "):
        read_jsonl(p)


# -- issue 26, item 5: vector readers --------------------------------------------------------------
@pytest.mark.parametrize("names", [["layer.1", "layer.01"], ["layer.\u0663"], ["layer.\u00b2"], ["layer.99999"]],
                         ids=["leading-zero-duplicate", "arabic-digit", "superscript", "too-many-layers"])
def test_non_canonical_safetensors_layer_keys_are_refused(tmp_path, names) -> None:
    from steerscope.vector import layer_indices

    with pytest.raises(VectorError, match="block index"):
        layer_indices({n: torch.zeros(4) for n in names}, "layer", tmp_path / "v.safetensors")


@pytest.mark.parametrize("name", ["direction.01", "direction.\u00b2", "direction.\u0663"])
def test_non_canonical_gguf_direction_keys_are_refused(tmp_path, name) -> None:
    from steerscope.control_vectors import import_gguf

    p = tmp_path / "cv.gguf"
    write_control_vector(p, {"direction.1": np.zeros(4, dtype=np.float32), name: np.zeros(4, dtype=np.float32)})
    with pytest.raises(VectorError):
        import_gguf(p)


def test_a_gguf_with_too_many_directions_is_refused(tmp_path) -> None:
    from steerscope.vector import MAX_LAYERS, layer_indices

    many = {f"direction.{i}": None for i in range(MAX_LAYERS + 1)}
    with pytest.raises(VectorError, match="more than 4096 layers"):
        layer_indices(many, "direction", tmp_path / "cv.gguf")


@pytest.mark.parametrize("header, claimed", [
    (b"GGUF" + struct.pack("<IQQ", 3, 10**6, 0), 10**6),  # v3, little-endian
    (b"GGUF" + struct.pack(">IQQ", 3, 10**6, 0), 10**6),  # v3, big-endian
    (b"GGUF" + struct.pack("<III", 1, 10**6, 0) + bytes(8), 10**6),  # v1: 32-bit counts
    (None, 4097),  # a whole file, one float per direction
], ids=["v3-le", "v3-be", "v1", "file-4097"])
def test_a_gguf_header_claiming_too_many_tensors_is_refused_before_they_are_parsed(header, claimed, tmp_path, capsys,
                                                                                  monkeypatch) -> None:
    """End to end (``steerscope inspect``): the tensor count is read from the header, and the reader never parses
    the tensor descriptions (10^6 of them took 112 s and 4 GiB)."""
    import time

    import gguf

    p = tmp_path / "cv.gguf"
    if header is None:
        write_control_vector(p, {f"direction.{i}": np.ones(1, dtype=np.float32) for i in range(claimed)})
    else:
        p.write_bytes(header)

    def parsed(*a, **k):
        raise AssertionError("GGUFReader parsed the file")

    monkeypatch.setattr(gguf, "GGUFReader", parsed)
    t0 = time.perf_counter()
    line = _one_error(capsys, main(["inspect", "--vector", str(p)]))
    assert f"header claims {claimed} tensors" in line and "at most 4096" in line, line
    assert time.perf_counter() - t0 < 30
    monkeypatch.undo()  # a control vector within the cap still reads
    write_control_vector(p, {"direction.1": np.ones(4, dtype=np.float32)})
    assert ss.SteeringVector.load(p).layers == [2]


@pytest.mark.parametrize("header", [
    b"GGUF" + struct.pack("<IQQ", 3, 1, 10**9),  # v3, little-endian
    b"GGUF" + struct.pack(">IQQ", 3, 1, 10**9),  # v3, big-endian
    b"GGUF" + struct.pack("<III", 1, 1, 10**9) + bytes(8),  # v1: 32-bit counts
], ids=["v3-le", "v3-be", "v1"])
def test_a_gguf_header_claiming_too_many_keys_is_refused_before_they_are_parsed(header, tmp_path, capsys,
                                                                               monkeypatch) -> None:
    """The metadata key count is capped the same way (the reader would parse every key first)."""
    import gguf

    p = tmp_path / "cv.gguf"
    p.write_bytes(header)

    def parsed(*a, **k):
        raise AssertionError("GGUFReader parsed the file")

    monkeypatch.setattr(gguf, "GGUFReader", parsed)
    line = _one_error(capsys, main(["inspect", "--vector", str(p)]))
    assert "header claims 1000000000 metadata keys" in line and "at most 4096" in line, line


@pytest.mark.parametrize("dtype", ["Q8_0", "I32"])
def test_quantized_or_integer_gguf_directions_are_refused(tmp_path, dtype) -> None:
    import gguf

    from steerscope.control_vectors import import_gguf

    p = tmp_path / "cv.gguf"
    w = gguf.GGUFWriter(str(p), "controlvector")
    w.add_uint32("controlvector.layer_count", 1)
    if dtype == "I32":
        w.add_tensor("direction.1", np.zeros(32, dtype=np.int32))
    else:
        raw = gguf.quants.quantize(np.ones(32, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("direction.1", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VectorError, match=f"stored as {dtype}"):
        import_gguf(p)
