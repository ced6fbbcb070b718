"""The one protocol every study follows, and the dataclass machinery behind its ``Config``.

A study package ``steerscope.studies.<name>`` has:

- ``config.py`` with a frozen dataclass ``Config`` deriving from :class:`StudyConfig`: ``to_dict()``,
  ``from_dict(d)``, ``add_arguments(parser)`` and ``from_args(namespace)``. Command-line options are
  derived from the fields declared with :func:`option` (name, default and ``--help`` text), so a
  default is written once, in the dataclass;
- ``pipeline.py`` with an argparse-free ``run(cfg, out, device="cpu", force=False) -> dict`` (the
  summary, with the report path under ``"report"``) and ``write_report(out) -> Path`` (the report
  rewritten from the finished steps in the run folder ``out``; nothing is computed anew).

Example:
    >>> @dataclass(frozen=True)
    ... class Config(StudyConfig):
    ...     n_test: int = option(100, "test prompts per side")
    ...     alphas: tuple[float, ...] = option((1.0,), "steering magnitudes", sep=",")
    >>> Config.from_args(parser.parse_args(["--alphas", "0.5,1"])).alphas
    (0.5, 1.0)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from steerscope._cliargs import int_range
from steerscope.errors import StudyError

C = TypeVar("C", bound="StudyConfig")
_KIND = {int: "integers", float: "numbers", str: "names"}


def option(default: Any, help: str, *, flag: str | None = None, sep: str | None = None,
           choices: tuple[Any, ...] | None = None, minimum: int | None = None, maximum: int | None = None) -> Any:
    """A dataclass field that is also a command-line option ``--<field-name>``.

    Args:
        default: the field's default (also the option's).
        help: the ``--help`` text; the default is appended to it.
        flag: another option name; for a bool field defaulting to True, e.g. ``"--no-shift"`` (stores False).
        sep: a tuple field given as one string split on ``sep`` (``--alphas 2,4,6``); the command line has
            one list syntax, comma-separated, so a tuple option is always given this way.
        choices: the allowed values.
        minimum, maximum: bounds of an int field (e.g. ``minimum=1`` for a count): the parser refuses a
            value outside them before anything runs, and :meth:`StudyConfig.check_ranges` refuses it in
            a configuration built in Python.

    Returns:
        A ``dataclasses.field`` carrying the option in its metadata.
    """
    meta = {"cli": True, "help": help, "flag": flag, "sep": sep, "choices": choices,
            "minimum": minimum, "maximum": maximum}
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_tuple) of an annotation such as ``tuple[int, ...] | None``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0], True
    return tp, False


def split_list(s: str, kind: Any, what: str, sep: str = ",") -> tuple[Any, ...]:
    """``"1,2, 3"`` -> ``(1, 2, 3)`` of ``kind``, with a fix-it :class:`StudyError` naming option ``what``."""
    try:
        return tuple(kind(x.strip()) for x in s.split(sep) if x.strip())
    except ValueError:
        raise StudyError(f"{what} takes {_KIND.get(kind, 'values')} separated by {sep!r}, got {s!r}") from None


class StudyConfig:
    """Base class of every study's frozen ``Config`` dataclass (see the module docstring)."""

    # A subclass sets this to give every option the default None (meaning: keep the preset's value).
    cli_defaults_none: typing.ClassVar[bool] = False

    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field[Any], Any]]:
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return {f.name: plain(getattr(self, f.name)) for f, _ in self._fields()}

    def __post_init__(self) -> None:
        self.check_ranges()

    def check_ranges(self) -> None:
        """Raise a one-line :class:`StudyError` for an int field outside its :func:`option` bounds
        (subclasses with their own ``__post_init__`` call ``super().__post_init__()``)."""
        for f, _ in self._fields():
            lo, hi, v = f.metadata.get("minimum"), f.metadata.get("maximum"), getattr(self, f.name)
            if isinstance(v, int) and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                bounds = " and ".join(x for x in (f"at least {lo}" if lo is not None else "",
                                                  f"at most {hi}" if hi is not None else "") if x)
                raise StudyError(f"--{f.name.replace('_', '-')} must be {bounds} (got {v})")

    def require_at_least_one(self, *names: str) -> None:
        """Raise a one-line :class:`StudyError` naming the option of the first field in ``names`` below 1.

        Example:
            >>> cfg.require_at_least_one("n_test", "max_new_tokens")  # in a subclass's ``__post_init__``
        """
        for name in names:
            if getattr(self, name) < 1:
                raise StudyError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")

    def identity(self) -> dict[str, Any]:
        """What a run folder's ``config.json`` holds and is checked against on resume (default: everything)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict` (lists become tuples where the field is a tuple)."""
        fields = {f.name: tp for f, tp in cls._fields()}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise StudyError(f"unknown configuration keys {unknown}; is this run folder from another study or version?")
        vals = {k: tuple(v) if _base_type(fields[k])[1] and isinstance(v, list) else v for k, v in d.items()}
        try:
            return cls(**vals)
        except (TypeError, ValueError, ArithmeticError) as e:  # a value of the wrong type, e.g. "traits": 5
            raise StudyError(f"the stored configuration has a value of the wrong type ({str(e)[:100]}); is this run "
                             "folder from another study or version?") from None

    @classmethod
    def load(cls: type[C], out: str | Path) -> C:
        """The configuration stored in a run folder (``config.json``)."""
        path = Path(out) / "config.json"
        if not path.is_file():
            raise StudyError(f"{out} holds no study run (no config.json); run the study there first")
        try:
            raw = json.loads(path.read_text("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: too deep
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:80]
            raise StudyError(f"{path} is not valid JSON ({why}); rerun the study there (--force) to rewrite it, "
                             "or use another --out") from None
        if not isinstance(raw, dict):
            raise StudyError(f"{path} holds a JSON {type(raw).__name__}, not a configuration object; rerun the study "
                             "there (--force) to rewrite it, or use another --out")
        return cls.from_dict(raw)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one option per :func:`option` field; defaults and help come from the fields."""
        defaults = cls()
        for f, tp in cls._fields():
            if not f.metadata.get("cli"):
                continue
            m, default = f.metadata, None if cls.cli_defaults_none else getattr(defaults, f.name)
            kind, is_tuple = _base_type(tp)
            name = m["flag"] or "--" + f.name.replace("_", "-")
            kw: dict[str, Any] = {"dest": f.name, "help": m["help"]}
            if kind is bool:
                stored = not getattr(defaults, f.name)
                kw.update(action="store_const", const=stored, default=None if cls.cli_defaults_none else not stored)
            else:
                if is_tuple and not m["sep"]:  # one list syntax on the command line: comma-separated
                    raise TypeError(f"{cls.__name__}.{f.name}: a tuple option needs sep=','")
                if is_tuple and default is not None:
                    default = m["sep"].join(f"{x:g}" if isinstance(x, float) else str(x) for x in default)
                bounded = kind is int and not is_tuple and (m.get("minimum") is not None or m.get("maximum") is not None)
                typ = int_range(m.get("minimum"), m.get("maximum")) if bounded else kind
                kw.update(default=default, type=str if m["sep"] else typ, choices=m["choices"])
                if m["choices"]:
                    kw["help"] += f"; one of {', '.join(map(str, m['choices']))}"
                if default is not None:
                    kw["help"] += f" (default: {default})"
            parser.add_argument(name, **kw)

    @classmethod
    def cli_values(cls, ns: argparse.Namespace) -> dict[str, Any]:
        """The option values in ``ns``, converted to the field types (None where not given in preset mode)."""
        out: dict[str, Any] = {}
        for f, tp in cls._fields():
            if not f.metadata.get("cli") or not hasattr(ns, f.name):
                continue
            v, (kind, is_tuple) = getattr(ns, f.name), _base_type(tp)
            if v is not None and is_tuple:
                sep = f.metadata["sep"]
                what = f.metadata["flag"] or "--" + f.name.replace("_", "-")
                v = split_list(v, kind, what, sep)
            out[f.name] = v
        return out

    @classmethod
    def from_args(cls: type[C], ns: argparse.Namespace) -> C:
        """The configuration the parsed command line asks for."""
        vals = cls.cli_values(ns)
        if cls.cli_defaults_none:
            vals = {k: v for k, v in vals.items() if v is not None}
        return cls(**vals)


def lazy_entry_points(package: str) -> typing.Callable[[str], Any]:
    """A module ``__getattr__`` for a study package: ``run`` and ``write_report`` come from its
    ``pipeline`` module on first use, so importing the package (for ``Config``) stays cheap.

    Example:
        >>> __getattr__ = lazy_entry_points(__name__)   # in studies/<name>/__init__.py
    """

    def __getattr__(name: str) -> Any:
        if name in ("run", "write_report"):
            import importlib

            return getattr(importlib.import_module(f"{package}.pipeline"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
