"""Contrast pairs and the seeded split of ``tune``.

The i-th positive is paired with the i-th negative (the longer side's extra examples are left out,
with a warning). A pair *shares a prompt* when both sides are ``(prompt, completion)`` with the same
prompt: its continuations are the two completions. Otherwise each side's continuation is its whole
text (a ``(prompt, completion)`` side becomes ``prompt + "\\n\\n" + completion``) and the chat
template's lead-in plays the prompt (:mod:`steerscope.tune.objective`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from steerscope.errors import DataError
from steerscope.tune.records import Split

MIN_PAIRS = 6  # two each for train, validation and test


@dataclass(frozen=True)
class Pair:
    """One contrast pair: the shared ``prompt`` (None when there is none) and the two continuations."""

    prompt: str | None
    positive: str
    negative: str


def _parts(ex: Any) -> tuple[str | None, str]:
    """(prompt, completion) of an example; (None, text) for a bare string."""
    if isinstance(ex, str):
        return None, ex
    if isinstance(ex, dict):
        return ex["prompt"], ex.get("completion") or ""
    prompt, completion = ex
    return prompt, completion


def _text(ex: Any) -> str:
    prompt, completion = _parts(ex)
    if prompt is None:
        return completion
    return prompt + ("\n\n" + completion if completion else "")


def pairs_of(positive: Sequence[Any], negative: Sequence[Any]) -> tuple[list[Pair], int]:
    """The contrast pairs of two example lists, and how many unpaired examples were left out.

    Example:
        >>> pairs_of([("Q", "Yes.")], [("Q", "No.")])[0]
        [Pair(prompt='Q', positive='Yes.', negative='No.')]
    """
    n = min(len(positive), len(negative))
    dropped = max(len(positive), len(negative)) - n
    if dropped:
        warnings.warn(f"tune pairs the i-th positive with the i-th negative: {dropped} unpaired examples of the "
                      f"longer side are left out ({len(positive)} positive, {len(negative)} negative)", stacklevel=3)
    out = []
    for p, q in zip(positive[:n], negative[:n]):
        (pp, pc), (qp, qc) = _parts(p), _parts(q)
        if pp is not None and pp == qp and pc and qc:
            out.append(Pair(pp, pc, qc))
        else:
            out.append(Pair(None, _text(p), _text(q)))
    if any(not x.positive.strip() or not x.negative.strip() for x in out):
        raise DataError("a contrast example is empty; give non-empty texts or completions")
    return out, dropped


def sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Train / validation / test sizes of ``n`` pairs: validation and test get at least 2 each, train the rest."""
    if n < MIN_PAIRS:
        raise DataError(f"tune needs at least {MIN_PAIRS} contrast pairs (2 each for train, validation and test), "
                        f"got {n}")
    total = float(sum(fractions))
    n_val = max(2, math.floor(n * fractions[1] / total))
    n_test = max(2, math.floor(n * fractions[2] / total))
    n_train = n - n_val - n_test
    if n_train < 2:
        raise DataError(f"{n} pairs leave {n_train} for training with fractions {list(fractions)}; give more pairs")
    return n_train, n_val, n_test


def split(n_pairs: int, n_neutral: int, seed: int, fractions: Sequence[float], shared_prompt: bool,
          dropped: int = 0) -> Split:
    """A seeded split: a permutation of the pairs cut into train / validation / test (:func:`sizes`),
    and of the neutral prompts cut into halves (validation, test).

    Example:
        >>> split(12, 8, seed=0, fractions=(0.5, 0.25, 0.25), shared_prompt=False).sizes()["validation"]
        3
    """
    n_train, n_val, _ = sizes(n_pairs, fractions)
    rng = np.random.default_rng(seed)
    perm = [int(i) for i in rng.permutation(n_pairs)]
    neutral = [int(i) for i in rng.permutation(n_neutral)]
    half = n_neutral // 2
    if half < 1:
        raise DataError(f"the KL needs at least 2 neutral prompts (one each for validation and test), got {n_neutral}")
    return Split(train=sorted(perm[:n_train]), validation=sorted(perm[n_train:n_train + n_val]),
                 test=sorted(perm[n_train + n_val:]), neutral_validation=sorted(neutral[:half]),
                 neutral_test=sorted(neutral[half:]), seed=seed, shared_prompt=shared_prompt, dropped=dropped)
