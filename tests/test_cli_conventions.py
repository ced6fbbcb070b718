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
