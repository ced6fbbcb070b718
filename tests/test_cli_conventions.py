"""Issue 26: command-line conventions (help text, negative numbers, one list syntax)."""

from __future__ import annotations

import argparse
from typing import Iterator

import pytest

from steerscope.cli import build_parser


def _parsers(p: argparse.ArgumentParser, path: str = "steerscope") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sp in act.choices.items():
                yield from _parsers(sp, f"{path} {name}")


def _expanded(act: argparse.Action) -> str:
    """The help text as --help shows it (%(default)s and %(choices)s filled in)."""
    params = dict(vars(act), prog="steerscope")
    if act.choices is not None:
        params["choices"] = ", ".join(map(str, act.choices))
    return (act.help or "") % params


def test_every_option_has_help_stating_default_and_choices() -> None:
    problems = []
    for path, p in _parsers(build_parser()):
        for act in p._actions:
            if isinstance(act, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{path} {'/'.join(act.option_strings) or act.dest}"
            text = _expanded(act)
            if not text.strip():
                problems.append(f"{name}: no help")
                continue
            d = act.default
            if d is not None and d is not False and act.nargs != 0:  # a flag's default is: not given
                shown = ",".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
                if shown not in text and str(d) not in text:
                    problems.append(f"{name}: help does not state the default {d!r}")
            if act.choices is not None and not all(str(c) in text for c in act.choices):
                problems.append(f"{name}: help does not list the choices {list(act.choices)}")
    assert not problems, "\n".join(problems)


def test_every_study_has_a_description() -> None:
    for path, p in _parsers(build_parser()):
        if path.startswith("steerscope study "):
            assert p.description, f"{path} has no description"


@pytest.mark.parametrize("argv, dest, value", [
    (["extract", "--positive", "p", "--negative", "n", "--out", "o", "--positions", "-3,-2,-1"], "positions",
     [-3, -2, -1]),
    (["extract", "--positive", "p", "--negative", "n", "--out", "o", "--positions", "-1"], "positions", [-1]),
    (["generate", "--alpha", "-4,4"], "alpha", "-4,4"),
    (["generate", "--alpha", "-2.5"], "alpha", "-2.5"),
    (["generate", "--positions", "-2,-1"], "positions", [-2, -1]),
    (["demo", "--alpha", "-3"], "alpha", -3.0),
])
def test_negative_numbers_need_no_equals_sign(argv: list[str], dest: str, value: object) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_negative_layers_without_equals_sign_reach_the_layer_check() -> None:
    """--layers -2,-1 is parsed as the option's value (then refused by the layer type, not as an unknown option)."""
    from steerscope.errors import ArgError

    with pytest.raises(ArgError, match="layer"):
        build_parser().parse_args(["generate", "--layers", "-2,-1"])


def test_lists_have_one_syntax_no_option_takes_several_words() -> None:
    """Lists are comma-separated everywhere (``--alphas 0.5,1``); none is given as several words."""
    several = [f"{path} {'/'.join(act.option_strings) or act.dest}" for path, p in _parsers(build_parser())
               for act in p._actions if act.nargs not in (None, "?", 0, argparse.PARSER)
               and not isinstance(act, argparse._SubParsersAction)]
    assert several == []


def test_refusal_study_alphas_are_comma_separated(capsys) -> None:
    from steerscope.cli import main
    from steerscope.studies.refusal.config import Config

    sub = next(p for path, p in _parsers(build_parser()) if path == "steerscope study refusal")
    cfg = Config.from_args(sub.parse_args(["--alphas", "0.5,1", "--select-alphas", "2, 4,8"]))
    assert cfg.alphas == (0.5, 1.0) and cfg.select_alphas == (2.0, 4.0, 8.0)
    assert Config.from_args(sub.parse_args([])).alphas == (1.0,)
    for argv in (["--alphas", "0.5", "1"], ["--select-alphas", "2,x"]):
        assert main(["study", "refusal", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err


def test_every_command_that_loads_a_model_takes_dtype_with_the_same_choices() -> None:
    from steerscope._cliargs import DTYPES

    problems = []
    for path, p in _parsers(build_parser()):
        dests = {act.dest: act for act in p._actions}
        if "model" not in dests and "model_name" not in dests:
            continue
        dtype = dests.get("dtype")
        if dtype is None or tuple(dtype.choices or ()) != DTYPES:
            problems.append(f"{path}: --dtype {'missing' if dtype is None else f'choices {dtype.choices}'}")
        elif not all(c in _expanded(dtype) for c in DTYPES):
            problems.append(f"{path}: --dtype help does not list its choices")
    assert problems == []


@pytest.mark.parametrize("study, loader", [("identifiability", "steerscope.load_model"),
                                           ("reasoning", "steerscope.studies.reasoning.pipeline.load_model")])
def test_studies_load_their_model_in_the_dtype_asked_for(study, loader, tmp_path, capsys, monkeypatch) -> None:
    import importlib

    from steerscope.cli import main
    from steerscope.errors import SteerscopeError

    seen = []

    def no_model(*a, **k):
        seen.append(k.get("dtype"))
        raise SteerscopeError("stop here")

    monkeypatch.setattr(loader, no_model)
    assert main(["study", study, "--out", str(tmp_path / "run"), "--dtype", "bfloat16"]) == 2
    assert "stop here" in capsys.readouterr().err and seen == ["bfloat16"]
    assert main(["study", study, "--out", str(tmp_path / "run"), "--dtype", "float64"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    Config = importlib.import_module(f"steerscope.studies.{study}.config").Config
    # float32 (the dtype every run folder had before the option) keeps the old identity: old folders resume
    assert "dtype" not in Config().identity() and Config(dtype="bfloat16").identity()["dtype"] == "bfloat16"


VECTOR_COMMANDS = ("generate", "inspect", "explain", "verify")  # every subcommand that takes one vector


def test_every_subcommand_names_its_vector_with_the_vector_option() -> None:
    """A vector is the same kind of argument everywhere: ``--vector V`` (a positional ``vector`` only as the
    older spelling beside it)."""
    found = {}
    for path, p in _parsers(build_parser()):
        dests = {act.dest: act for act in p._actions}
        if "vector" in dests or "vector_positional" in dests:
            found[path.removeprefix("steerscope ")] = dests["vector"].option_strings
    assert found == {c: ["--vector"] for c in VECTOR_COMMANDS}


@pytest.mark.parametrize("command, rest", [("inspect", []), ("explain", ["--out", "o"]), ("verify", [])])
def test_the_vector_is_taken_as_an_option_or_positionally_but_not_both(command, rest, capsys) -> None:
    from steerscope.cli import main

    p = build_parser()
    for argv in ([command, "--vector", "v.safetensors", *rest], [command, "v.safetensors", *rest],
                 [command, *rest, "v.safetensors"]):
        a = p.parse_args(argv)
        assert a.vector == "v.safetensors" and not hasattr(a, "vector_positional")
    for argv, why in (([command, "a.safetensors", "--vector", "b.safetensors", *rest], "given twice"),
                      ([command, *rest], "a vector is required")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: steerscope {command}: ") and why in err
        assert "Traceback" not in err


def test_generate_sampling_is_seeded_and_json_carries_the_settings(tiny_folder, capsys) -> None:
    import json

    from steerscope.cli import main

    def run(seed: int) -> dict:
        rc = main(["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--prompt", "Tell me a story",
                   "--max-new-tokens", "12", "--do-sample", "--temperature", "1.5", "--seed", str(seed), "--json"])
        assert rc == 0
        return json.loads(capsys.readouterr().out)

    a, b, c = run(1), run(1), run(2)
    assert a["unsteered"] == b["unsteered"]
    assert a["unsteered"] != c["unsteered"]
    assert a["do_sample"] is True and a["temperature"] == 1.5 and a["seed"] == 1
    assert a["model"] and a["max_new_tokens"] == 12 and a["positions"] == "all"


@pytest.fixture(scope="module")
def one_layer_vector(tiny_folder, tmp_path_factory):
    from steerscope.cli import main

    d = tmp_path_factory.mktemp("vec")
    (d / "pos.txt").write_text("Write a formal letter.\nCompose an official memo.\n")
    (d / "neg.txt").write_text("yo whats up\nhey buddy lol\n")
    out = d / "v.safetensors"
    assert main(["extract", "--model", str(tiny_folder), "--positive", str(d / "pos.txt"), "--negative",
                 str(d / "neg.txt"), "--layers", "1", "--positions", "-2,-1", "--out", str(out), "--json"]) == 0
    return out


def test_generate_prints_the_relative_dose_and_takes_alpha_relative(tiny_folder, one_layer_vector, capsys) -> None:
    import json

    from steerscope.cli import main

    capsys.readouterr()
    base = ["generate", "--model", str(tiny_folder), "--vector", str(one_layer_vector), "--prompt", "Hello",
            "--max-new-tokens", "3"]
    assert main(base + ["--alpha", "-2,2"]) == 0
    assert "relative dose alpha*|v|/|resid| at alpha=-2" in capsys.readouterr().err
    assert main(base + ["--alpha-relative", "-0.5,0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [d["1"] for d in res["relative_dose"].values()] == pytest.approx([0.5, 0.5])
    assert res["alpha"][0] == pytest.approx(-res["alpha"][1]) and res["layers"] == [1]
    assert main(base + ["--alpha", "1", "--alpha-relative", "0.5"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_the_degenerate_dose_warning_fires_from_about_1x_once_naming_the_largest() -> None:
    import warnings

    import torch

    import steerscope as ss
    from steerscope.cli import _doses

    vec = ss.SteeringVector({1: torch.full((4,), 0.5), 2: torch.full((4,), 1.0)})  # |v| 1 and 2
    resid = {1: 10.0, 2: 10.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doses = _doses(vec, [-4.9, 4.9], resid)  # at most 0.98x: no warning
    assert doses["4.9"] == pytest.approx({"1": 0.49, "2": 0.98})
    with pytest.warns(UserWarning) as got:
        _doses(vec, [1.0, 6.0, -7.0], resid)  # 1.2x at 6 and 1.4x at -7 (layer 2)
    assert len(got) == 1
    assert str(got[0].message).startswith("relative dose alpha*|v|/|resid| is 1.4x at alpha=-7, layer 2 "
                                          "(residual norm 10); outputs often degenerate from about 1x")


def test_generate_warns_once_about_a_dose_above_1x(tiny_folder, one_layer_vector, capsys) -> None:
    from steerscope.cli import main

    capsys.readouterr()
    base = ["generate", "--model", str(tiny_folder), "--vector", str(one_layer_vector), "--prompt", "Hello",
            "--max-new-tokens", "2", "--json"]
    assert main(base + ["--alpha-relative", "0.9"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(base + ["--alpha-relative", "-1.4,1.2"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "is 1.4x at alpha=" in warned[0] and "degenerate from about 1x" in warned[0]


def test_inspect_compare_at_different_layers_prints_both_and_the_difference(tmp_path, capsys) -> None:
    import json

    import torch

    import steerscope as ss
    from steerscope.cli import main

    ss.SteeringVector({1: torch.ones(4), 2: torch.ones(4)}).save(tmp_path / "a.safetensors")
    ss.SteeringVector({3: 2 * torch.ones(4)}).save(tmp_path / "b.safetensors")
    assert main(["inspect", str(tmp_path / "a.safetensors"), "--compare", str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "layer   1: norm 2.0000" in out and "layer   3: norm 4.0000" in out
    assert "layers differ: only in" in out and "[1, 2]" in out and "[3]" in out and "no shared layers" in out
    assert main(["inspect", str(tmp_path / "a.safetensors"), "--compare", str(tmp_path / "b.safetensors"),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compare"]["layers"] == [3] and info["compare"]["only_first"] == [1, 2] and info["cosine"] == {}


def test_extract_reads_the_shipped_pair_files_with_site_system_and_chat(tiny_folder, tmp_path, capsys) -> None:
    import json

    import steerscope as ss
    from steerscope.cli import main
    from steerscope.data import data_path

    out = tmp_path / "v.safetensors"
    pairs = data_path("traits", "formality.jsonl")
    assert main(["extract", "--model", str(tiny_folder), "--pairs", str(pairs), "--layers", "1", "--site",
                 "resid_post", "--no-chat", "--system", "Be brief.", "--batch-size", "64", "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = sum(1 for line in pairs.read_text().splitlines() if line.strip())
    assert info["n_positive"] == info["n_negative"] == n and info["site"] == "resid_post"
    assert ss.SteeringVector.load(out).site == "resid_post"
    assert main(["extract", "--model", str(tiny_folder), "--pairs", str(pairs), "--positive", str(pairs),
                 "--out", str(out)]) == 2
    assert "--pairs replaces" in capsys.readouterr().err
    assert main(["extract", "--model", str(tiny_folder), "--out", str(out)]) == 2


def test_run_folder_of_another_config_is_refused_naming_the_setting_and_leaves_no_steps(tmp_path) -> None:
    from steerscope.errors import StudyError
    from steerscope.runs import Run

    with Run(tmp_path / "r", config={"seed": 0, "n": 4}):
        pass
    assert not (tmp_path / "r" / "steps").exists()  # nothing recorded: no empty steps/ folder
    with pytest.raises(StudyError, match=r"seed: 0 -> 1"):
        Run(tmp_path / "r", config={"seed": 1, "n": 4})
    assert not (tmp_path / "r" / "steps").exists()
    with Run(tmp_path / "r", config={"seed": 0, "n": 4}) as run:
        run.step("a", lambda: {"x": 1})
    assert (tmp_path / "r" / "steps" / "a.json").is_file()


def test_study_refuses_another_config_before_the_model_loads(tmp_path, capsys, monkeypatch) -> None:
    import json

    import steerscope as ss
    from steerscope.cli import main
    from steerscope.studies.identifiability import Config

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(Config().identity()))

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ss, "load_model", no_model)
    monkeypatch.setattr("steerscope.models.load.load_model", no_model)
    assert main(["study", "identifiability", "--out", str(out), "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "seed: 0 -> 7" in err
    assert not (out / "steps").exists()


def test_generate_shows_progress_except_with_json(tiny_folder, capsys, monkeypatch) -> None:
    import steerscope as ss
    from steerscope.cli import main

    seen: list[bool] = []
    real = ss.generate

    def spy(*a, **k):
        seen.append(k.get("show_progress", False))
        return real(*a, **k)

    monkeypatch.setattr(ss, "generate", spy)
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--max-new-tokens", "2", "--json"]) == 0
    assert seen == [True, False]


def test_generate_top_k_1_equals_greedy_and_json_carries_top_p_top_k(tiny_folder, capsys) -> None:
    import json

    from steerscope.cli import main

    def run(*extra: str) -> dict:
        assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--max-new-tokens", "8",
                     "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    greedy = run()
    top1 = run("--do-sample", "--temperature", "1.5", "--top-k", "1", "--top-p", "0.9", "--seed", "3")
    assert top1["unsteered"] == greedy["unsteered"]
    assert top1["top_k"] == 1 and top1["top_p"] == 0.9 and greedy["top_k"] == 0 and greedy["top_p"] == 1.0


@pytest.mark.parametrize("opt, val", [("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-p", "x"),
                                      ("--top-k", "-1"), ("--top-k", "2.5")])
def test_generate_refuses_top_p_top_k_out_of_range_in_one_line(opt, val, capsys) -> None:
    from steerscope.cli import main

    assert main(["generate", opt, val]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and opt in err and "Traceback" not in err


def test_every_integer_option_but_seeds_has_bounds() -> None:
    """A count or index is checked by the parser (one ``int_range`` type), never found wrong after the model loads."""
    loose = [f"{path} {act.option_strings[0]}" for path, p in _parsers(build_parser()) for act in p._actions
             if act.type is int and act.option_strings[0] != "--seed" and not act.choices]
    assert not loose, loose


@pytest.mark.parametrize("argv", [
    ["study", "identifiability", "--n-cov-prompts", "0"], ["study", "identifiability", "--n-jac-prompts", "0"],
    ["study", "identifiability", "--n-k-prompts", "0"], ["study", "identifiability", "--n-shift-prompts", "0"],
    ["study", "identifiability", "--n-shift-prompts", "31"], ["study", "identifiability", "--k-traits", "0"],
    ["study", "identifiability", "--layer", "-1"], ["study", "reasoning", "--k", "1"],
    ["study", "reasoning", "--steps", "0"], ["study", "reasoning", "--prompts-per-step", "0"],
    ["study", "reasoning", "--n-test", "0"], ["study", "reasoning", "--seeds", "0"],
    ["study", "refusal-mechanisms", "--n-ablate", "-1"], ["demo", "--layer", "-2"],
])
def test_bad_sizes_are_refused_before_the_model_loads_and_leave_no_folder(argv, tmp_path, capsys, monkeypatch) -> None:
    import steerscope as ss
    from steerscope.cli import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ss, "load_model", no_model)
    monkeypatch.setattr("steerscope.models.load.load_model", no_model)
    out = tmp_path / "run"
    assert main(argv + (["--out", str(out)] if argv[0] == "study" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and argv[2] in err
    assert not out.exists()


def test_a_config_built_in_python_checks_the_same_bounds() -> None:
    from steerscope.errors import StudyError
    from steerscope.studies.identifiability import Config

    with pytest.raises(StudyError, match="--n-cov-prompts must be at least 1"):
        Config(n_cov_prompts=0)


def test_extract_refuses_a_line_longer_than_the_context_in_one_line(tiny_folder, tmp_path, capsys) -> None:
    from steerscope.cli import main

    (tmp_path / "pos.txt").write_text("Write a formal letter.\n" + "x" * 3_000_000 + "\n")
    (tmp_path / "neg.txt").write_text("yo\nhey\n")
    assert main(["extract", "--model", str(tiny_folder), "--positive", str(tmp_path / "pos.txt"), "--negative",
                 str(tmp_path / "neg.txt"), "--layers", "1", "--out", str(tmp_path / "v.safetensors")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "positive example 2" in err[0] and "context" in err[0]
    assert not (tmp_path / "v.safetensors").exists()


def _no_model(monkeypatch) -> None:
    import steerscope as ss

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ss, "load_model", no_model)
    monkeypatch.setattr("steerscope.models.load.load_model", no_model)


def test_tune_refuses_an_out_folder_of_another_config_before_the_model_loads(tmp_path, capsys, monkeypatch) -> None:
    import json

    from steerscope.cli import main
    from steerscope.data import load_examples
    from steerscope.tune import Settings
    from steerscope.tune.tuner import run_config

    (tmp_path / "pos.txt").write_text("Write a formal letter.\nCompose an official memo.\n")
    (tmp_path / "neg.txt").write_text("yo whats up\nhey buddy lol\n")
    pos, neg = load_examples(str(tmp_path / "pos.txt")), load_examples(str(tmp_path / "neg.txt"))
    out = tmp_path / "run"
    out.mkdir()
    old = run_config("smollm2-135m", pos, neg, "dim", "logodds", [3, 6], ["all", "prompt"], 1.0, 5, False, 0,
                     Settings())
    (out / "config.json").write_text(json.dumps(old))
    _no_model(monkeypatch)
    argv = ["tune", "--positive", str(tmp_path / "pos.txt"), "--negative", str(tmp_path / "neg.txt"), "--out",
            str(out)]
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "seed: 0 -> 1" in err and err.count("\n") == 1
    assert not (out / "steps").exists()
    assert main(argv) == 1 and "the model was loaded" in capsys.readouterr().err  # the same settings pass the check


def test_explain_refuses_an_out_folder_of_another_config_before_the_model_loads(tmp_path, capsys, monkeypatch) -> None:
    import json

    import steerscope as ss
    from steerscope.cli import main
    from steerscope.data import neutral_prompts
    from steerscope.explain.card import card_config
    from steerscope.explain.context import Settings

    vec = ss.SteeringVector.load("smollm2-135m-safe/refusal-dim")
    out = tmp_path / "card"
    out.mkdir()
    old = card_config("smollm2-135m-safe", vec, neutral_prompts(8), 6.0, None, None, Settings.quick(), None)
    (out / "config.json").write_text(json.dumps(old))
    _no_model(monkeypatch)
    assert main(["explain", "smollm2-135m-safe/refusal-dim", "--quick", "--alpha", "4", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "another configuration" in err[0] and "alpha: 6.0 -> 4.0" in err[0]
    assert not (out / "steps").exists()
    assert main(["explain", "smollm2-135m-safe/refusal-dim", "--quick", "--alpha", "6", "--out", str(out)]) == 1
    assert "the model was loaded" in capsys.readouterr().err  # the same settings pass the check
