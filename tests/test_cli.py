"""The command line: JSON output, one-line errors with non-zero exit, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import steerscope as ss
from steerscope.cli import main


@pytest.fixture(scope="module")
def contrast_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "pos.txt").write_text("Write a formal letter.\nCompose an official memo.\n")
    (d / "neg.jsonl").write_text('{"prompt": "yo whats up"}\n{"prompt": "hey buddy lol"}\n')
    return d


def test_extract_inspect_generate_json(tiny_folder, contrast_files, tmp_path, capsys):
    out = tmp_path / "v.safetensors"
    rc = main(["extract", "--model", str(tiny_folder), "--positive", str(contrast_files / "pos.txt"),
               "--negative", str(contrast_files / "neg.jsonl"), "--layers", "1,2", "--out", str(out), "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [1, 2] and info["n_positive"] == 2
    assert ss.SteeringVector.load(out).provenance.model == str(tiny_folder)
    rc = main(["inspect", str(out), "--compare", str(out), "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cosine"]["1"] == pytest.approx(1.0)
    rc = main(["generate", "--model", str(tiny_folder), "--vector", str(out), "--alpha=-2,2",
               "--prompt", "Hello", "--max-new-tokens", "4", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["steered"]) == {"-2.0", "2.0"} and len(res["unsteered"]) == 1


def test_user_errors_print_one_line_and_exit_2(tiny_folder, contrast_files, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "safetensors" in err[0]
    big = ss.SteeringVector({1: torch.ones(7)})
    big.save(tmp_path / "wrong.safetensors")
    assert main(["generate", "--model", str(tiny_folder), "--vector", str(tmp_path / "wrong.safetensors")]) == 2
    assert "d_model" in capsys.readouterr().err
    assert main(["extract", "--model", str(tiny_folder), "--positive", str(contrast_files / "pos.txt"),
                 "--negative", str(contrast_files / "neg.jsonl"), "--layers", "99", "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_folder), "--alpha", "nan"]) == 2
    assert "finite" in capsys.readouterr().err
    assert main(["extract", "--model", str(tmp_path / "nomodel"), "--positive", "a.txt", "--negative", "b.txt",
                 "--out", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_has_no_traceback_on_user_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "steerscope.cli", "inspect", str(tmp_path / "none.safetensors")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.startswith("error:")


def test_load_model_errors():
    with pytest.raises(ss.SteerscopeError, match="does not exist"):
        ss.load_model("./no/such/folder")
    with pytest.raises(ss.SteerscopeError, match="GGUF file not found"):
        ss.load_model("/tmp/none.gguf")
    with pytest.raises(ss.SteerscopeError, match="dtype"):
        ss.load_model("smollm2-135m", dtype="int3")


def _warnings(err: str, word: str) -> list[str]:
    """The ``warning:`` lines of ``err`` that mention ``word`` (a progress bar may precede one on its line)."""
    return [w for w in err.split("warning:")[1:] if word in w.split("\n")[0]]


def test_generate_warns_once_about_another_fingerprint(tiny_folder, tmp_path, capsys):
    prov = ss.Provenance(model="no/such-model", fingerprint="0123456789abcdef")
    ss.SteeringVector({1: torch.ones(64)}, provenance=prov).save(tmp_path / "v.safetensors")
    rc = main(["generate", "--model", str(tiny_folder), "--vector", str(tmp_path / "v.safetensors"), "--alpha=-1,1",
               "--prompt", "Hello", "--max-new-tokens", "2", "--json"])
    assert rc == 0
    assert len(_warnings(capsys.readouterr().err, "fingerprint")) == 1


def test_generate_without_model_uses_the_vectors_model(tiny_folder, tmp_path, capsys):
    tiny = ss.load_model(str(tiny_folder))
    ss.SteeringVector({1: torch.ones(64)}, provenance=ss.Provenance.for_model(tiny)).save(tmp_path / "v.safetensors")
    rc = main(["generate", "--vector", str(tmp_path / "v.safetensors"), "--prompt", "Hello", "--max-new-tokens", "2",
               "--json"])
    assert rc == 0  # on the default model (d_model 576) this 64-dim vector would be refused
    assert not _warnings(capsys.readouterr().err, "fingerprint")


def test_generate_with_a_shipped_vector_runs_on_its_model(capsys):
    rc = main(["generate", "--vector", "smollm2-135m-safe/refusal-dim", "--prompt", "Hi", "--max-new-tokens", "2",
               "--json"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "smollm2-135m-safe" in err and not _warnings(err, "fingerprint")
