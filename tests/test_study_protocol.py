"""Every study follows one protocol: Config (to_dict / from_dict / add_arguments / from_args with
defaults written once, in the dataclass), an argparse-free run(cfg, out, device, force) and write_report(out)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
from pathlib import Path

import pytest

from steerscope.cli import STUDIES, build_parser
from steerscope.errors import StudyError
from steerscope.studies.protocol import StudyConfig, option, split_list

PACKAGES = sorted(STUDIES.values())


def _parser(cfg_cls: type) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cfg_cls.add_arguments(p)
    return p


@pytest.mark.parametrize("package", PACKAGES)
def test_every_study_exposes_config_run_and_write_report(package: str) -> None:
    study = importlib.import_module(package)
    assert dataclasses.is_dataclass(study.Config) and issubclass(study.Config, StudyConfig)
    assert study.Config.__dataclass_params__.frozen
    run = inspect.signature(study.run)
    assert list(run.parameters) == ["cfg", "out", "device", "force"]
    assert run.parameters["device"].default == "cpu" and run.parameters["force"].default is False
    assert list(inspect.signature(study.write_report).parameters) == ["out"]


@pytest.mark.parametrize("package", PACKAGES)
def test_config_round_trips_through_json(package: str) -> None:
    Config = importlib.import_module(package).Config
    cfg = Config()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert Config.from_dict(d) == cfg
    with pytest.raises(StudyError, match="unknown configuration keys"):
        Config.from_dict({**d, "no_such_knob": 1})


@pytest.mark.parametrize("package", [p for p in PACKAGES if not p.endswith("reasoning")])
def test_an_empty_command_line_gives_the_dataclass_defaults(package: str) -> None:
    Config = importlib.import_module(package).Config
    assert Config.from_args(_parser(Config).parse_args([])) == Config()


def test_reasoning_options_default_to_the_preset() -> None:
    from steerscope.studies.reasoning.config import PRESETS, Config

    p = _parser(Config)
    assert Config.from_args(p.parse_args([])) == PRESETS["cpu"]
    tiny = Config.from_args(p.parse_args(["--preset", "tiny", "--steps", "3", "--no-lora", "--layers", "mid,-1"]))
    assert tiny == dataclasses.replace(PRESETS["tiny"], steps=3, lora=False, layers=("mid", "-1"))
    assert Config.from_args(p.parse_args(["--preset", "tiny", "--gate"])).gate is True


def test_options_are_derived_from_fields_with_their_defaults_and_help() -> None:
    @dataclasses.dataclass(frozen=True)
    class Toy(StudyConfig):
        n: int = option(3, "how many")
        alphas: tuple[float, ...] = option((1.0, 2.5), "scales", sep=",")
        words: tuple[str, ...] = option(("a",), "words", sep=",")
        layer: int | None = option(None, "a layer")
        on: bool = option(True, "turn it off", flag="--off")
        hidden: int = 7

    p = _parser(Toy)
    help_text = p.format_help()
    assert "how many (default: 3)" in help_text and "scales (default: 1,2.5)" in help_text
    assert "--off" in help_text and "--hidden" not in help_text
    cfg = Toy.from_args(p.parse_args(["--n", "5", "--alphas", "0.5, 4", "--words", "x,y", "--layer", "2", "--off"]))
    assert cfg == Toy(n=5, alphas=(0.5, 4.0), words=("x", "y"), layer=2, on=False)
    with pytest.raises(StudyError, match="--alphas takes numbers"):
        Toy.from_args(p.parse_args(["--alphas", "1,x"]))
    assert split_list("1, 2,", int, "--k") == (1, 2)


def test_study_options_keep_their_names_and_defaults() -> None:
    """The command line of every study as documented before the protocol (names and defaults)."""
    sub = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["study"]._actions
           if isinstance(a, argparse._SubParsersAction)}["study"].choices
    expected = {
        "refusal": {"model": "smollm2-135m-safe", "seed": 0, "n_train": 128, "n_val": 16, "n_test": 100,
                    "layer_stride": 2, "layers": None, "alphas": "1", "max_new_tokens": 64, "n_trained": 64,
                    "trained_epochs": 3, "trained_lr": 0.3, "trained_batch": 8, "gen_batch": 32, "threads": 1,
                    "retrain_organism": False, "shipped_vectors": False},
        "refusal-mechanisms": {"model": "smollm2-135m-safe", "alpha_bypass": -1.0, "alpha_induce": 1.0, "n_eval": 32,
                               "eval_tokens": 32, "n_attr": 8, "attr_tokens": 24, "steps": 10, "vectors": None,
                               "vector_dir": None, "quick": False},
        "identifiability": {"model": "smollm2-135m", "traits": "formality,sentiment,politeness", "layer": None,
                            "offset": 0, "methods": "dim", "alphas": "3,6", "seeds": "0,1", "n_prompts": 8,
                            "max_new_tokens": 16, "temperature": 0.8, "ks": "1,5,10,20,50", "n_k_prompts": 2,
                            "n_shift_prompts": 9, "k_traits": 1, "shift": True, "shift_alpha": None,
                            "n_cov_prompts": 64, "n_jac_prompts": 1},
        "reasoning": {"preset": "cpu", "layers": None, "steps": None, "k": None, "prompts_per_step": None,
                      "lr": None, "n_test": None, "difficulty": None, "transfer_model": None},
    }
    for name, defaults in expected.items():
        ns = sub[name].parse_args([])
        assert {k: getattr(ns, k) for k in defaults} == defaults, name
        assert (ns.out, ns.device, ns.force, ns.report_only) == (f"runs/{name}", "cpu", False, False)


def test_write_report_needs_a_run_folder(tmp_path: Path) -> None:
    from steerscope.studies import refusal, refusal_mechanisms

    with pytest.raises(StudyError, match="no config.json"):
        refusal_mechanisms.write_report(tmp_path)
    with pytest.raises(StudyError, match="results.json"):
        refusal.write_report(tmp_path)


def test_a_broken_study_import_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study whose code imports a missing package must not silently vanish from the command line."""
    from steerscope import cli

    pkg = tmp_path / "broken_study"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("import steerscope_no_such_dependency  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.STUDIES, "broken", "broken_study")
    with pytest.raises(ModuleNotFoundError, match="steerscope_no_such_dependency"):
        cli.main(["vectors"])


def test_identifiability_write_report_rebuilds_the_report_from_the_run_folder(tmp_path: Path) -> None:
    """write_report(out) reads config.json and the step records only; no model is loaded."""
    from steerscope.runs import Run
    from steerscope.studies import identifiability
    from steerscope.studies.identifiability import pipeline, steps
    from steerscope.studies.identifiability.config import Config
    from steerscope.studies.identifiability.equivalence import equivalence
    from steerscope.studies.identifiability.records import generation_step
    from test_identifiability_study import _scores

    cfg = Config(traits=("formality",), alphas=(4.0,), seeds=(0, 1), shift=False)
    run = Run(tmp_path, config=cfg.identity())
    scores = _scores(2.0, 2.0)
    usable = {"formality": {"probe": True}}
    spec = {"sigma": [3.0, 1.0], "rank_threshold": 2, "rank_entropy": 1.8, "null_fraction_threshold": 0.0,
            "null_fraction_entropy": 0.1, "d": 2}
    records = {
        "vectors": {"layer": 15, "inject_layer": 15, "norms": {"formality_dim": 13.0}, "files": {}, "cos_dim_pca": {},
                    "cos_traits": {}},
        "scorers": {"scorers": {"formality": [{"kind": "probe", "accuracy": 0.96, "validation": "cv", "usable": True}]},
                    "primary": {"formality": "probe"}},
        "scores": scores,
        "effects": {"neutral": [r.to_dict() for r in steps.effects(cfg, scores, {"formality": "probe"}, usable)],
                    "shift": []},
        "logits": {"agreement": [], "subspaces": []},
        "nullspace": {"layers": [15], "n_tokens": 4, "covariance": {"15": spec}, "jacobian": {"15": spec}, "J_vperp_over_J_v": {}},
    }
    records["equivalence"] = equivalence(cfg, scores, {"formality": "probe"}).to_dict()
    for cell in pipeline.cells(cfg):
        records[generation_step(cell)] = {"v@4": ["Dear Sir"]} if cell[1] != "none" else {"none@0": ["hi"]}
    for name, rec in records.items():
        run.step(name, lambda rec=rec: rec)
    path = identifiability.write_report(tmp_path)
    html = path.read_text()
    assert path == tmp_path / "report.html" and "equivalent" in html and "Spectral rank (not a behavioural null space)" in html and "Dear Sir" in html
