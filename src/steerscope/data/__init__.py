"""Shipped prompt sets and loaders for user files (txt: one prompt a line; jsonl; json; csv)."""

from __future__ import annotations

import csv
import io
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


def neutral_prompts(n: int | None = None) -> list[str]:
    """The shipped neutral prompt set (``data/traits/neutral_prompts.jsonl``), its first ``n`` prompts (None: all).

    Args:
        n: how many, from the top of the file.

    Returns:
        The prompts, in file order.

    Example:
        >>> neutral_prompts(3)
        ['...', '...', '...']
    """
    return [r["prompt"] for r in read_jsonl(data_path("traits", "neutral_prompts.jsonl"))][:n]


def shipped_vectors() -> list[str]:
    """Names of vectors shipped inside the package, as ``"<alias>/<name>"``."""
    root = resources.files("steerscope") / "data" / "vectors"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir():
                out += [f"{d.name}/{f.name[:-12]}" for f in d.iterdir() if f.name.endswith(".safetensors")]
    return sorted(out)


def read_text(path: str | Path) -> str:
    """A file's text; :class:`DataError` when it is missing, a folder, unreadable or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None


def lines(text: str) -> list[str]:
    """``text`` split only at ``\n`` (a trailing ``\r`` dropped): not :meth:`str.splitlines`, which also
    splits at form feeds, ``\x1c``-``\x1e``, U+2028 and other characters a prompt may contain."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a jsonl file of JSON objects; one clear error for a bad line."""
    rows = []
    for i, line in enumerate(lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            json.dumps(row, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape is no text
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove that line") from None
        except RecursionError:
            raise DataError(f"{path}:{i} is nested too deeply; fix or remove that line") from None
        except UnicodeEncodeError:
            raise DataError(f"{path}:{i} holds a lone surrogate escape (not valid Unicode text); fix or "
                            "remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i} is a JSON {type(row).__name__}, not an object such as "
                            '{"prompt": "..."}; fix or remove that line')
        rows.append(row)
    return rows


def read_records(path: str | Path, allow_txt: bool = True) -> list[Any]:
    """Records of a txt (one string a line), jsonl, json (a list, or the first list in an object)
    or csv file; one clear :class:`DataError` for a missing, malformed or unsupported file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt" and allow_txt:
        return [ln for ln in lines(read_text(path)) if ln.strip()]
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            rows = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg})") from None
        if isinstance(rows, dict):
            rows = next((v for v in rows.values() if isinstance(v, list)), [])
        if not isinstance(rows, list):
            raise DataError(f"{path} holds a JSON {type(rows).__name__}; expected a list of records")
        return rows
    if suffix == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(read_text(path), newline="")))
        except csv.Error as e:
            raise DataError(f"{path} is not a readable CSV file ({e})") from None
    kinds = ".txt, .jsonl, .json or .csv" if allow_txt else ".csv, .json or .jsonl"
    raise DataError(f"{path}: unsupported file type {suffix!r}; use {kinds}")


def load_examples(path: str | Path) -> list[Any]:
    """Load prompts or (prompt, completion) pairs from txt, jsonl, json or csv.

    A record with ``completion`` becomes a ``(prompt, completion)`` pair; otherwise its text field
    (prompt / instruction / goal / behavior / text / question) is used.
    """
    rows = read_records(path)
    out: list[Any] = []
    for i, r in enumerate(rows, 1):
        if isinstance(r, str):
            out.append(r)
            continue
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is a JSON {type(r).__name__}; give strings or objects with a "
                            f"text field ({', '.join(_TEXT_KEYS[:3])}, ...)")
        text = next((r[k] for k in _TEXT_KEYS if k in r and r[k]), None)
        if text is None:
            raise DataError(f"{path}: record {i} has none of the fields {', '.join(_TEXT_KEYS)}: {str(r)[:80]}")
        completion = r.get("completion")
        if not isinstance(text, str) or (completion and not isinstance(completion, str)):
            raise DataError(f"{path}: record {i}: the text and completion fields must be strings")
        out.append((text, completion) if completion else text)
    if not out:
        raise DataError(f"{path} holds no examples")
    return out
