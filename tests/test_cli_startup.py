"""Issue 26: the command line starts fast: importing it and building its parser import no torch or
transformers; the torch-free name tables agree with the tables they mirror; ``--help`` still lists
every subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
HEAVY = ("torch", "transformers")


def _heavy_modules_after(code: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    p = subprocess.run([sys.executable, "-c", code + f"\nimport sys; print(','.join(m for m in {HEAVY!r} "
                        "if m in sys.modules))"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [m for m in p.stdout.strip().split(",") if m]


def test_importing_the_cli_and_building_its_parser_imports_no_torch() -> None:
    assert _heavy_modules_after("import steerscope.cli as c; c.build_parser()") == []


def test_help_and_vectors_run_without_importing_torch() -> None:
    code = ("import contextlib, io\nimport steerscope.cli as c\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        c.main(['--help'])\n    except SystemExit:\n        pass\n"
            "    assert c.main(['vectors']) == 0")
    assert _heavy_modules_after(code) == []


def test_help_lists_every_subcommand() -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-m", "steerscope.cli", "--help"], env=env, capture_output=True,
                         text=True, timeout=120).stdout
    for name in ("extract", "generate", "inspect", "vectors", "demo", "serve", "vllm-setup", "explain", "tune",
                 "study"):
        assert name in out, name


def test_the_torch_free_name_tables_agree_with_the_tables_they_mirror() -> None:
    from steerscope.data import names as _names
    from steerscope.extract.aggregate import METHODS
    from steerscope.metrics.classifiers import TRAITS
    from steerscope.models.load import ALIASES, DEFAULT_MODEL

    assert tuple(ALIASES) == _names.ALIAS_NAMES and DEFAULT_MODEL == _names.DEFAULT_MODEL
    assert tuple(METHODS) == _names.METHOD_NAMES and tuple(TRAITS) == _names.TRAIT_NAMES


def test_inspect_of_a_safetensors_vector_imports_no_torch_and_matches_the_steering_vector(capsys) -> None:
    code = ("import contextlib, io\nimport steerscope.cli as c\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert c.main(['inspect', 'smollm2-135m-safe/refusal-dim', '--compare', "
            "'smollm2-135m-safe/refusal-po']) == 0")
    assert _heavy_modules_after(code) == []
    import json

    import steerscope as ss
    from steerscope.cli import main

    assert main(["inspect", "smollm2-135m-safe/refusal-dim", "--compare", "smollm2-135m-safe/refusal-po",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    a, b = ss.SteeringVector.load("smollm2-135m-safe/refusal-dim"), ss.SteeringVector.load("smollm2-135m-safe/refusal-po")
    assert info["norms"] == {str(k): v for k, v in a.norms().items()}
    assert abs(info["cosine"]["18"] - a.cosine(b)[18]) < 1e-6
