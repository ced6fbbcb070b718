"""Refusal prompt sets (shared by the refusal studies): fixed seeded splits of the shipped prompts, and loaders for standard sets.

Splits (``data/refusal/splits.json``, made once by :func:`make_splits` with seed 0 and shipped so
they never change): per side (harmful, harmless) ``train`` 128, ``val`` 32, ``test`` 100 and the
rest ``organism`` (used only to fine-tune the safety organism). Records marked ``organism_only``
(extra harmless anchors written later, ids after the first 340) always go to ``organism``; the
other ids are shuffled exactly as before, so adding them changed no other split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from steerscope._files import atomic_write
from steerscope.data import data_path, read_jsonl, read_records
from steerscope.errors import DataError

SIDES = ("harmful", "harmless")
SPLITS = ("train", "val", "test", "organism")
SIZES = {"train": 128, "val": 32, "test": 100}

# standard sets: name -> text field of their records
STANDARD_FIELDS = {"advbench": "goal", "harmbench": "Behavior", "jailbreakbench": "Goal",
                   "strongreject": "forbidden_prompt", "alpaca": "instruction"}
_HUB_IDS = {"advbench": ("walledai/AdvBench", "prompt"), "harmbench": ("walledai/HarmBench", "prompt"),
            "jailbreakbench": ("JailbreakBench/JBB-Behaviors", "Goal"),
            "strongreject": ("walledai/StrongREJECT", "prompt"), "alpaca": ("tatsu-lab/alpaca", "instruction")}


def make_splits(seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Shuffle each side's ids with ``seed`` and cut train / val / test / organism."""
    out: dict[str, dict[str, list[str]]] = {}
    for side in SIDES:
        recs = read_jsonl(data_path("refusal", f"{side}.jsonl"))
        ids = [r["id"] for r in recs if not r.get("organism_only")]
        extra = [r["id"] for r in recs if r.get("organism_only")]
        random.Random(seed).shuffle(ids)
        a, b, c = SIZES["train"], SIZES["train"] + SIZES["val"], SIZES["train"] + SIZES["val"] + SIZES["test"]
        out[side] = {"train": ids[:a], "val": ids[a:b], "test": ids[b:c], "organism": ids[c:] + extra}
    return out


def load_split(side: str, split: str) -> list[str]:
    """Instructions of one shipped split, in the stored order.

    Example:
        >>> len(load_split("harmful", "train"))
        128
    """
    if side not in SIDES or split not in SPLITS:
        raise DataError(f"unknown split {side}/{split}; sides {SIDES}, splits {SPLITS}")
    ids = json.loads(data_path("refusal", "splits.json").read_text())[side][split]
    by_id = {r["id"]: r["instruction"] for r in read_jsonl(data_path("refusal", f"{side}.jsonl"))}
    return [by_id[i] for i in ids]


def refusal_strings() -> list[str]:
    """The shipped varied refusal responses (one a line)."""
    return [ln.strip() for ln in data_path("refusal", "refusals.txt").read_text().splitlines() if ln.strip()]


def load_standard(name: str, path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts of a standard set from a local CSV/JSON/JSONL file, or from the hub via ``datasets``.

    Args:
        name: ``advbench`` (field ``goal``), ``harmbench`` (``Behavior``), ``jailbreakbench``
            (``Goal``), ``strongreject`` (``forbidden_prompt``) or ``alpaca`` (``instruction``).
        path: a local file; without it the set is fetched with ``datasets`` (needs the package
            and a network connection).
        limit: keep the first ``limit`` prompts.

    Returns:
        The prompt strings. (Alpaca rows with a non-empty ``input`` get it appended.)

    Example:
        >>> load_standard("advbench", "harmful_behaviors.csv")[:1]
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in STANDARD_FIELDS:
        raise DataError(f"unknown standard set {name!r}; choose one of {', '.join(STANDARD_FIELDS)}")
    rows = _read_local(Path(path)) if path is not None else _read_hub(key)
    fields = [STANDARD_FIELDS[key], STANDARD_FIELDS[key].lower(), "prompt", "instruction", "goal"]
    out = []
    for r in rows:
        text = next((r[f] for f in fields if isinstance(r.get(f), str) and r[f].strip()), None)
        if text is None:
            raise DataError(f"{name}: a record has no field {STANDARD_FIELDS[key]!r}: {str(r)[:80]}")
        extra = r.get("input") if key == "alpaca" else None
        out.append(f"{text}\n\n{extra}" if isinstance(extra, str) and extra.strip() else text)
    if not out:
        raise DataError(f"{name}: no prompts found")
    return out[:limit] if limit else out


def _read_local(path: Path) -> list[dict[str, Any]]:
    return read_records(path, allow_txt=False)


def _read_hub(key: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading {key} from the hub needs 'pip install datasets'; or pass a local file") from None
    hub_id, _ = _HUB_IDS[key]
    try:
        ds = datasets.load_dataset(hub_id, split="train")
    except Exception as e:
        raise DataError(f"cannot fetch {hub_id} ({str(e)[:100]}); download it and pass the local file") from None
    return [dict(r) for r in ds]


if __name__ == "__main__":  # regenerate the shipped split file (never needed; kept for provenance)
    atomic_write(Path(str(data_path("refusal"))) / "splits.json", json.dumps(make_splits(0), indent=1).encode())
