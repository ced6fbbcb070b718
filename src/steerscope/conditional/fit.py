"""Fitting a condition on contrast prompts: the CAST grid search, done with held-out splits.

1. Split each class (positive, negative) with ``numpy.random.default_rng(seed)`` into train / validation / test
   by ``fractions`` (default 0.5 / 0.25 / 0.25, at least one prompt per split; the sizes are in the record).
2. For every candidate layer, read ``resid_pre`` (``hidden_states[layer]``) of the chat-formatted prompts and reduce
   it over the real tokens (``mean`` / ``max``: the token mean; ``last``: the last real token).
3. On train: the difference-in-means direction d = μ₊ − μ₋, the center c = (μ₊ + μ₋) / 2 and the scale s = the
   pooled within-class standard deviation of the projections, so a score is ((h − c) · d̂) / s (0 = midway).
   With ``probe="logistic"``: an L2-regularised logistic regression on the train features, standardised per
   dimension, fitted by ``scipy.optimize.minimize`` (L-BFGS-B) on scikit-learn's objective
   ``C · Σ log(1 + exp(−y z)) + ½‖w‖²`` (intercept not penalised) for each ``C`` in ``Cs``; mapped back to the
   residual, d = w / σ and c the point of the decision boundary on d, so the score keeps the same form
   (0 = the boundary) and the gate runs unchanged. ``C`` is chosen with the layer in step 4.
4. On validation: each layer's best threshold by **balanced accuracy** (mean of the true-positive and the
   true-negative rate; thresholds midway between sorted validation scores, ties to the middle one); the layer
   with the highest validation balanced accuracy wins (ties: the lowest layer, which can gate the most layers;
   then the smallest ``C``, the strongest regularisation).
   With ``max_fpr`` (a safety gate that may fire on at most that share of negatives): each layer's threshold is
   the lowest one whose validation false-positive rate is at most ``max_fpr``, and the layer with the highest
   validation true-positive rate there wins (ties: the lowest layer); the Neyman-Pearson choice.
5. On test (never seen before): balanced accuracy of the chosen layer and threshold, with a 95 % stratified
   percentile bootstrap interval (:func:`steerscope.stats.bootstrap_ci`, classes resampled separately) and
   Wilson intervals of the two rates (:func:`steerscope.stats.wilson`).

Reference: Lee et al., "Programming Refusal with Conditional Activation Steering" (CAST, 2024).

Example:
    >>> fit = fit_probe(lm, harmful, harmless, layers=range(4, 12))
    >>> fit.report.test_balanced_accuracy, fit.report.test_ci95, fit.report.n_test
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from steerscope.errors import DataError
from steerscope.models.lm import LM
from steerscope.stats import bootstrap_ci, fit_logistic, wilson

Feature = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (h [b pos d], mask [b pos]) -> [b ...]


@dataclass(frozen=True)
class FitReport:
    """How a condition was fitted (module docstring) and how well it separates held-out prompts.

    ``n_*`` are (positive, negative) counts; rates and balanced accuracies are in [0, 1]; ``val_by_layer`` is each
    candidate layer's best validation ``metric`` (balanced accuracy, or with ``max_fpr`` the true-positive rate at
    the threshold that keeps the validation false-positive rate within it; a layer where the train class means
    coincide, e.g. the last token of a chat template at layer 0, is left out); ``val_balanced_accuracy`` is the
    chosen layer's and threshold's; ``n`` is the number of test prompts.

    Example:
        >>> r = harmful.report; print(f"{r.test_balanced_accuracy:.2f} {r.test_ci95} n={r.n}")
    """

    layer: int
    threshold: float
    reduce: str
    seed: int
    fractions: tuple[float, float, float]
    n_train: tuple[int, int]
    n_val: tuple[int, int]
    n_test: tuple[int, int]
    val_balanced_accuracy: float
    test_balanced_accuracy: float
    test_ci95: tuple[float, float]
    test_tpr: float
    test_tpr_ci95: tuple[float, float]
    test_tnr: float
    test_tnr_ci95: tuple[float, float]
    val_by_layer: dict[int, float] = field(default_factory=dict)
    metric: str = "balanced_accuracy"  # or "tpr_at_fpr" (with max_fpr): what val_by_layer holds and the layer maximised
    max_fpr: float | None = None
    interval: str = "stratified percentile bootstrap, 2000 resamples"
    probe: str = "dim"  # or "logistic": how the direction was fitted on train (module docstring, step 3)
    C: float | None = None  # the logistic probe's chosen inverse regularisation strength

    @property
    def n(self) -> int:
        """Number of test prompts."""
        return self.n_test[0] + self.n_test[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (layer keys of ``val_by_layer`` become strings)."""
        d = asdict(self)
        d["val_by_layer"] = {str(k): v for k, v in self.val_by_layer.items()}
        d["n"] = self.n
        return d


@dataclass(frozen=True)
class ProbeFit:
    """What :func:`fit_probe` returns: the direction [d_model], center [d_model], scale and the record."""

    direction: torch.Tensor
    center: torch.Tensor
    scale: float
    report: FitReport


def split(n: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train / validation / test indices of ``n`` items (each at least one; needs n >= 3).

    Example:
        >>> [len(s) for s in split(8, (0.5, 0.25, 0.25), 0)]
        [4, 2, 2]
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = max(1, int(round(fractions[0] * n)))
    n_val = max(1, int(round(fractions[1] * n)))
    n_tr = min(n_tr, n - n_val - 1)
    return perm[:n_tr], perm[n_tr : n_tr + n_val], perm[n_tr + n_val :]


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy) of the gate ``score > threshold`` that best separates ``pos`` from ``neg``.

    Candidates lie midway between consecutive distinct scores (and just outside them); among the best,
    the middle one.

    Example:
        >>> best_threshold(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
        (1.5, 1.0)
    """
    s = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    ba = np.array([balanced_accuracy(pos, neg, t) for t in cands])
    best = np.flatnonzero(ba == ba.max())
    i = best[len(best) // 2]
    return float(cands[i]), float(ba[i])


def threshold_at_fpr(pos: np.ndarray, neg: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """(threshold, true-positive rate) of the gate ``score > threshold`` with the most true positives among those
    that open on at most ``max_fpr`` of ``neg``: the lowest such threshold (candidates as in :func:`best_threshold`).

    Example:
        >>> threshold_at_fpr(np.array([2.0, 3.0]), np.array([0.0, 1.0, 2.5]), 0.34)
        (1.5, 1.0)
    """
    s = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    t = float(min(c for c in cands if np.mean(neg > c) <= max_fpr))  # the top candidate opens on none
    return t, float(np.mean(pos > t))


def balanced_accuracy(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    """(TPR + TNR) / 2 of the gate ``score > threshold``.

    Example:
        >>> balanced_accuracy(np.array([1.0, -1.0]), np.array([-2.0]), 0.0)
        0.75
    """
    return float((np.mean(pos > threshold) + np.mean(neg <= threshold)) / 2)


def _mean_or_last(reduce: str) -> Feature:
    def feat(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if reduce == "last":
            cols = torch.arange(h.shape[1], device=h.device)
            last = torch.where(mask, cols, torch.full_like(cols, -1)).max(1).values
            return h[torch.arange(h.shape[0], device=h.device), last]
        m = mask[..., None].float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    return feat


def _read(lm: LM, texts: Sequence[str], layers: Sequence[int], feature: Callable[[int, torch.Tensor, torch.Tensor],
          torch.Tensor], chat: bool, batch_size: int) -> dict[int, torch.Tensor]:
    """``feature(layer, h, mask)`` of ``hidden_states[layer]`` (float32, [b pos d]) per layer, rows concatenated."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(texts), batch_size):
        batch = lm.tokenize(list(texts[i : i + batch_size]), padding_side="left", templated=chat)
        with torch.no_grad():
            hs = lm.model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        mask = batch["attention_mask"].bool()
        for layer in layers:
            out[layer].append(feature(layer, hs[layer].float(), mask).cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


Probe = tuple[torch.Tensor, torch.Tensor, float]  # (unit direction, center, scale): score = ((h − c) · u) / s
PROBES = ("dim", "logistic")
CS = (0.001, 0.01, 0.1, 1.0)
NO_PROBE = {"dim": "the positive and negative prompts have identical mean activations at every candidate layer",
            "logistic": "the logistic probe found no direction (all weights zero) at any candidate layer: the "
                        "classes are not separable there; try larger Cs or other layers"}
LOGISTIC_STEPS = 5000  # L-BFGS iterations at most (a separable split at C = 1 needs hundreds)


def _train(f: torch.Tensor, y: np.ndarray) -> Probe | None:
    """(unit direction, center, scale) from train features f [n d_model]; None when the class means coincide."""
    yt = torch.as_tensor(y, dtype=torch.bool)
    mu_p, mu_n = f[yt].mean(0), f[~yt].mean(0)
    d = mu_p - mu_n
    if not bool(torch.isfinite(d).all()) or float(d.norm()) == 0:
        return None
    return _scaled(f, yt, d / d.norm(), (mu_p + mu_n) / 2)


def sklearn_l2(C: float, n: int) -> float:
    """:func:`steerscope.stats.fit_logistic`'s ``l2`` that gives scikit-learn's ``LogisticRegression(C=C)`` optimum on n rows.

    scikit-learn minimises ``C · Σ log(1 + exp(−y' (x·w + b))) + ½‖w‖²``; divided by ``C · n`` that is the mean
    loss plus ``‖w‖² / (2 C n)``, the same minimiser.

    Example:
        >>> sklearn_l2(0.5, 100)
        0.01
    """
    return 1.0 / (2.0 * C * n)


def _train_logistic(f: torch.Tensor, y: np.ndarray, C: float) -> Probe | None:
    """The logistic probe (module docstring, step 3) as (unit direction, center, scale); None when it is flat."""
    x = f.double().numpy()
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    w, b = fit_logistic((x - mu) / sd, np.asarray(y), sklearn_l2(C, len(x)), steps=LOGISTIC_STEPS)
    d = w.numpy() / sd  # score d·h + b0 in the residual's own coordinates
    norm = float(np.linalg.norm(d))
    if not np.isfinite(norm) or norm == 0:
        return None
    b0 = b - float(d @ mu)
    yt = torch.as_tensor(y, dtype=torch.bool)
    u = torch.as_tensor(d / norm, dtype=f.dtype)
    return _scaled(f, yt, u, torch.as_tensor(-b0 * d / norm**2, dtype=f.dtype))


def _scaled(f: torch.Tensor, yt: torch.Tensor, u: torch.Tensor, c: torch.Tensor) -> Probe:
    """(u, c, s) with s the pooled within-class standard deviation of the train projections (1 where it is 0)."""
    proj = (f - c) @ u
    var = [float(proj[k].var(unbiased=False)) if int(k.sum()) > 0 else 0.0 for k in (yt, ~yt)]
    s = float(np.sqrt((var[0] + var[1]) / 2))
    return u, c, (s if np.isfinite(s) and s > 0 else 1.0)


def _scores(lm: LM, texts: Sequence[str], probes: dict[tuple[int, int], Probe], feats: dict[int, torch.Tensor],
            reduce: str, chat: bool, batch_size: int) -> dict[tuple[int, int], np.ndarray]:
    """Each (layer, probe) key's score of every prompt, as the gate computes it (``max``: a second pass over the
    tokens, every probe of a layer in one matrix product)."""
    if reduce != "max":
        return {key: (((feats[key[0]] - c) @ u) / s).numpy() for key, (u, c, s) in probes.items()}
    keys = {layer: [k for k in probes if k[0] == layer] for layer in dict.fromkeys(k[0] for k in probes)}
    stacked = {layer: (torch.stack([probes[k][0] for k in ks], 1),  # [d k] directions, c·u, scales
                       torch.stack([probes[k][1] @ probes[k][0] for k in ks]),
                       torch.tensor([probes[k][2] for k in ks])) for layer, ks in keys.items()}

    def tokmax(layer: int, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        us, cu, sc = (t.to(h.device, h.dtype) for t in stacked[layer])
        p = (h @ us - cu) / sc  # [b pos k]
        return torch.where(mask[..., None], p, torch.full_like(p, -torch.inf)).max(1).values
    got = _read(lm, texts, list(keys), tokmax, chat, batch_size)
    return {k: got[layer][:, j].numpy() for layer, ks in keys.items() for j, k in enumerate(ks)}


def _best_per_layer(val: dict[tuple[int, int], tuple[float, float]]) -> dict[int, float]:
    """Each layer's best validation metric over its probes (``val``: (layer, probe) -> (threshold, metric))."""
    out: dict[int, float] = {}
    for (layer, _), (_, metric) in val.items():
        out[layer] = max(metric, out.get(layer, -np.inf))
    return out


def _check(lm: LM, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int] | None,
           fractions: Sequence[float], max_fpr: float | None, probe: str = "dim",
           Cs: Sequence[float] = CS) -> list[int]:
    if isinstance(positive, str) or isinstance(negative, str):
        raise DataError("positive and negative are lists of prompts, not single strings")
    if min(len(positive), len(negative)) < 4:
        raise DataError(f"fitting a condition needs at least 4 prompts per class (train, validation and test), "
                        f"got {len(positive)} positive and {len(negative)} negative")
    if max_fpr is not None and not 0 <= max_fpr < 1:
        raise DataError(f"max_fpr is a false-positive rate in [0, 1), got {max_fpr}")
    if probe not in PROBES:
        raise DataError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    if probe == "logistic" and (not len(Cs) or min(Cs) <= 0):
        raise DataError(f"Cs are positive inverse regularisation strengths, got {tuple(Cs)}")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions are (train, validation, test), each > 0, summing to 1; got {tuple(fractions)}")
    cand = list(range(lm.n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in cand if not 0 <= x < lm.n_layers]
    if not cand or bad:
        raise DataError(f"candidate layers must be in 0..{lm.n_layers - 1}, got {cand}")
    return cand


def _test_figures(pos: np.ndarray, neg: np.ndarray, threshold: float, seed: int) -> dict[str, Any]:
    hit, rej = (pos > threshold).astype(float), (neg <= threshold).astype(float)
    ci = bootstrap_ci(hit, rej, stat=lambda a, b: float((a.mean() + b.mean()) / 2), n_boot=2000, seed=seed)
    return dict(test_balanced_accuracy=float((hit.mean() + rej.mean()) / 2), test_ci95=(float(ci[0]), float(ci[1])),
                test_tpr=float(hit.mean()), test_tpr_ci95=wilson(int(hit.sum()), len(hit)),
                test_tnr=float(rej.mean()), test_tnr_ci95=wilson(int(rej.sum()), len(rej)))


def fit_probe(lm: LM, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int] | None = None,
              reduce: str = "mean", seed: int = 0, system: str | None = None, chat: bool = True,
              batch_size: int = 16, fractions: Sequence[float] = (0.5, 0.25, 0.25),
              max_fpr: float | None = None, probe: str = "dim", Cs: Sequence[float] = CS) -> ProbeFit:
    """Fit a gate's direction, normalisation, layer and threshold (the module docstring's five steps).

    Args:
        lm: the model.
        positive, negative: prompts on which the gate should open / stay shut (user messages when ``chat``).
        layers: candidate layers (None: all).
        reduce: ``mean``, ``max`` or ``last`` (as the condition will use it).
        seed: seed of the split and of the bootstrap.
        system: system message of the chat template; chat: apply the template (as ``ss.generate`` does).
        batch_size: prompts per forward pass.
        fractions: (train, validation, test) shares of each class.
        max_fpr: choose the layer and threshold for the highest true-positive rate at a validation false-positive
            rate of at most this (None: by balanced accuracy); see the module docstring, step 4.
        probe: ``dim`` (difference in means) or ``logistic`` (L2 logistic regression, ``C`` chosen from ``Cs`` on
            validation with the layer); see the module docstring, step 3.
        Cs: the logistic probe's candidate inverse regularisation strengths.

    Returns:
        A :class:`ProbeFit` (direction, center, scale, :class:`FitReport`).

    Example:
        >>> fit = fit_probe(lm, harmful, harmless, layers=[4, 6, 8], seed=0)
    """
    cand = _check(lm, positive, negative, layers, fractions, max_fpr, probe, Cs)
    n_p = len(positive)
    texts = [lm.format_chat(p, system) if chat else p for p in [*positive, *negative]]
    y = np.array([1] * n_p + [0] * len(negative))
    sp, sn = split(n_p, fractions, seed), split(len(negative), fractions, seed + 1)
    parts = [np.concatenate([a, n_p + b]) for a, b in zip(sp, sn)]
    base = _mean_or_last(reduce)
    feats = _read(lm, texts, cand, lambda _l, h, m: base(h, m), chat, batch_size)
    cs: list[float | None] = [None] if probe == "dim" else [float(c) for c in Cs]
    made = {(layer, j): (_train(feats[layer][parts[0]], y[parts[0]]) if c is None
                         else _train_logistic(feats[layer][parts[0]], y[parts[0]], c))
            for layer in cand for j, c in enumerate(cs)}
    probes = {key: p for key, p in made.items() if p is not None}
    if not probes:
        raise DataError(NO_PROBE[probe])
    scores = _scores(lm, texts, probes, feats, reduce, chat, batch_size)
    rule = best_threshold if max_fpr is None else partial(threshold_at_fpr, max_fpr=max_fpr)
    val = {key: rule(s[parts[1]][y[parts[1]] == 1], s[parts[1]][y[parts[1]] == 0]) for key, s in scores.items()}
    key = max(val, key=lambda k: (val[k][1], -k[0], -k[1]))
    layer, threshold = key[0], val[key][0]
    by_layer = _best_per_layer(val)
    v = scores[key][parts[1]]
    val_ba = balanced_accuracy(v[y[parts[1]] == 1], v[y[parts[1]] == 0], threshold)
    test = scores[key][parts[2]]
    figures = _test_figures(test[y[parts[2]] == 1], test[y[parts[2]] == 0], threshold, seed)
    report = FitReport(layer=layer, threshold=threshold, reduce=reduce, seed=seed,
                       fractions=(float(fractions[0]), float(fractions[1]), float(fractions[2])),
                       n_train=(len(sp[0]), len(sn[0])), n_val=(len(sp[1]), len(sn[1])), n_test=(len(sp[2]), len(sn[2])),
                       val_balanced_accuracy=val_ba, val_by_layer=by_layer,
                       metric="balanced_accuracy" if max_fpr is None else "tpr_at_fpr", max_fpr=max_fpr, **figures,
                       probe=probe, C=cs[key[1]])
    u, c, s = probes[key]
    return ProbeFit(direction=u, center=c, scale=s, report=report)
