"""``steerscope tune`` on the command line and ``benchmarks/bench_tune.py --tiny``: the ``--json``
schema, one-line errors before the model loads, the benchmark runs; tiny models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import steerscope as ss
from steerscope.cli import main
from test_refusal_mechanisms_fixtures import one_thread, smol_tokenizer, tiny_lm  # noqa: F401
from test_tune import NEG, POS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    lm = tiny_lm()
    lm.model.save_pretrained(d / "model")
    lm.tokenizer.save_pretrained(d / "model")
    (d / "pos.txt").write_text("\n".join(POS) + "\n")
    (d / "neg.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in NEG))
    return d


def test_tune_json_prints_the_issue_schema_and_writes_a_usable_vector(files, tmp_path, capsys, one_thread):
    rc = main(["tune", "--model", str(files / "model"), "--positive", str(files / "pos.txt"), "--negative",
               str(files / "neg.jsonl"), "--out", str(tmp_path / "run"), "--layers", "1-2", "--positions", "all",
               "--n-alphas", "2", "--seed", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"vector", "recommended", "test", "search"}
    assert {"layer", "alpha", "positions", "site", "kl_budget"} <= set(out["recommended"])
    assert {"effect", "ci95", "n", "kl_worst5"} <= set(out["test"]) and out["test"]["n"] == 2
    assert {"evaluations", "grid_size"} <= set(out["search"]) and out["search"]["grid_size"] == 4
    assert out["search"]["evaluations"] == 1 and out["search"]["split"]["validation"] == 2  # a quarter of the grid
    vec = ss.SteeringVector.load(out["vector"])
    assert vec.provenance.use.alpha == out["recommended"]["alpha"] and vec.layers == [out["recommended"]["layer"]]
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.parametrize("args, msg", [
    (["--positive", "missing.txt"], "file not found"),
    (["--layers", "1,x"], "--layers"),
    (["--layers", "5-2"], "--layers"),
    (["--kl-budget", "-1"], "--kl-budget"),
    (["--kl-budget", "nan"], "--kl-budget"),
    (["--budget-evals", "0"], "--budget-evals"),
    (["--positions", "middle"], "--positions"),
    (["--method", "magic"], "--method"),
])
def test_bad_input_is_one_line_before_the_model_loads(files, tmp_path, capsys, args, msg):
    base = {"--model": str(tmp_path / "no-such-model"), "--positive": str(files / "pos.txt"),
            "--negative": str(files / "neg.jsonl"), "--out": str(tmp_path / "run")}
    base.update(dict(zip(args[::2], args[1::2])))
    rc = main(["tune", *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert "no-such-model" not in err[0]  # refused before the (missing) model was looked for


def test_out_of_range_layers_are_one_line(files, tmp_path, capsys):
    rc = main(["tune", "--model", str(files / "model"), "--positive", str(files / "pos.txt"), "--negative",
               str(files / "neg.jsonl"), "--out", str(tmp_path / "run"), "--layers", "2,9"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]  # (the model loader's progress bar aside)
    assert rc == 2 and len(lines) == 1 and "out of range" in lines[0] and "0..3" in lines[0] and "Traceback" not in err


def test_pairs_file_tunes_the_same_as_two_files(files, tmp_path, capsys, one_thread):
    """``--pairs`` (the shipped pair-file format, as ``extract`` takes it) gives the run two files give."""
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n"
                                                  for p, n in zip(POS, NEG)))
    common = ["--model", str(files / "model"), "--layers", "1-2", "--positions", "all", "--n-alphas", "2", "--json"]
    outs = []
    for name, src in (("two", ["--positive", str(files / "pos.txt"), "--negative", str(files / "neg.jsonl")]),
                      ("pairs", ["--pairs", str(tmp_path / "pairs.jsonl")])):
        assert main(["tune", *src, "--out", str(tmp_path / name), *common]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["recommended"] == outs[1]["recommended"] and outs[0]["test"] == outs[1]["test"]
    cfg = [json.loads((tmp_path / n / "config.json").read_text())["data"] for n in ("two", "pairs")]
    assert cfg[0] == cfg[1]  # the same data hash: the same run identity


@pytest.mark.parametrize("args, msg", [
    (["--pairs", "P", "--positive", "P"], "--pairs replaces --positive/--negative"),
    (["--positive", "P"], "tune needs --pairs FILE, or both --positive and --negative"),
    (["--pairs", "BAD"], "lacks a \"positive\" or \"negative\" key"),
])
def test_pairs_misuse_is_one_line(tmp_path, capsys, args, msg):
    (tmp_path / "P").write_text(json.dumps({"positive": "a", "negative": "b"}) + "\n")
    (tmp_path / "BAD").write_text(json.dumps({"positive": "a"}) + "\n")
    argv = [str(tmp_path / x) if x in ("P", "BAD") else x for x in args]
    rc = main(["tune", *argv, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_console_script_prints_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "steerscope.cli", "tune", "--positive", str(tmp_path / "a.txt"),
                        "--negative", str(tmp_path / "b.txt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")


def test_bench_tune_runs_on_a_tiny_model(capsys, one_thread):
    spec = importlib.util.spec_from_file_location("bench_tune", ROOT / "benchmarks" / "bench_tune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--json"]) == 0
    (case,) = json.loads(capsys.readouterr().out)["cases"]
    assert case["grid_size"] == 24 and case["evaluations"] == 6 and case["evals"] == 0.25
    assert {"ratio", "in_ci", "search_seconds", "grid_test_ci95"} <= set(case)
