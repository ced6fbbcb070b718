"""Typed result records: frozen dataclasses with a strict-JSON round trip.

Every analysis, card section and study step returns a :class:`Record`. ``to_dict()`` gives plain
JSON data (tuples become lists, nested records dicts); ``from_dict()`` rebuilds the record from
that data using the class's type hints, so a renamed field is a type error, not a silently empty
report column. Keys starting with ``_`` (run-store bookkeeping such as ``_seconds``) are ignored.

Example:
    >>> @dataclass(frozen=True)
    ... class Share(Record):
    ...     value: float
    ...     ci95: tuple[float, float]
    >>> Share.from_dict(Share(0.5, (0.4, 0.6)).to_dict())
    Share(value=0.5, ci95=(0.4, 0.6))
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


@dataclass(frozen=True)
class Record:
    """Base of every typed result record (a frozen dataclass)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data: nested records as dicts, tuples as lists (non-finite floats kept as floats)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """The record of ``to_dict()`` data; unknown ``_``-keys are ignored, missing optional fields default.

        Raises:
            TypeError: a required field is missing or a value does not fit its type.
        """
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kw[f.name] = _build(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}: field {f.name!r} is missing")
        return cls(**kw)


def _plain(x: Any) -> Any:
    if isinstance(x, Record):
        return x.to_dict()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(tp: Any, value: Any) -> Any:
    """``value`` (plain data) as an instance of the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:  # strict JSON stores non-finite numbers as null
        return float("nan") if tp is float else None
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _build(a, value)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{value!r} fits none of {tp}")
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__} needs a dict, got {type(value).__name__}")
        return tp.from_dict(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v) for v in value)
        return tuple(_build(a, v) for a, v in zip(args, value))
    if origin is list:
        return [_build(args[0], v) for v in value]
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{value!r} is not a number")
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TypeError(f"{value!r} is not a {tp.__name__}")
    return value


def finite_or_nan(x: float | None) -> float:
    """``x`` as a float, NaN for None (JSON null) or non-finite values."""
    return float("nan") if x is None or not math.isfinite(x) else float(x)


__all__ = ["Record", "finite_or_nan"]
