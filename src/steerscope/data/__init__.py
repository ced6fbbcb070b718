"""Shipped prompt sets and loaders for user files (txt: one prompt a line; jsonl; json; csv)."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path
from typing import Any

from steerscope.errors import DataError

_TEXT_KEYS = ("prompt", "instruction", "goal", "Behavior", "behavior", "forbidden_prompt", "text", "question")


def data_path(*parts: str) -> Path:
    """Path of a file shipped in ``steerscope/data``."""
    p = Path(str(resources.files("steerscope").joinpath("data", *parts)))
    if not p.exists():
        raise DataError(f"shipped data file {'/'.join(parts)} is missing from this installation")
    return p


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a jsonl file; one clear error for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def read_records(path: str | Path, allow_txt: bool = True) -> list[Any]:
    """Records of a txt (one string a line), jsonl, json (a list, or the first list in an object)
    or csv file; one clear :class:`DataError` for a missing, malformed or unsupported file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt" and allow_txt:
        return [ln for ln in path.read_text().splitlines() if ln.strip()]
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg})") from None
        if isinstance(rows, dict):
            rows = next((v for v in rows.values() if isinstance(v, list)), [])
        return list(rows)
    if suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    kinds = ".txt, .jsonl, .json or .csv" if allow_txt else ".csv, .json or .jsonl"
    raise DataError(f"{path}: unsupported file type {suffix!r}; use {kinds}")


def load_examples(path: str | Path) -> list[Any]:
    """Load prompts or (prompt, completion) pairs from txt, jsonl, json or csv.

    A record with ``completion`` becomes a ``(prompt, completion)`` pair; otherwise its text field
    (prompt / instruction / goal / behavior / text / question) is used.
    """
    rows = read_records(path)
    out: list[Any] = []
    for r in rows:
        if isinstance(r, str):
            out.append(r)
            continue
        text = next((r[k] for k in _TEXT_KEYS if k in r and r[k]), None)
        if text is None:
            raise DataError(f"{path}: a record has none of the fields {', '.join(_TEXT_KEYS)}: {str(r)[:80]}")
        out.append((text, r["completion"]) if r.get("completion") else text)
    if not out:
        raise DataError(f"{path} holds no examples")
    return out
