"""Trained steering vectors: NTP (next-token prediction) and PO (uni-directional RePS / BiPO-style).

Paper A (Cheng et al. 2026, arXiv 2604.08524), after BiPO (Cao et al. 2024) and RePS (Wu et al. 2025):

1. The vector v [d_model] is a ``torch.nn.Parameter`` added at one layer's ``resid_pre`` at every
   position (prompt and completion) through :func:`steerscope.hooks.attached`: h <- h + s * alpha * v,
   where s = +1 or -1 is the example's steering sign. Model weights stay frozen.
2. Each example is (prompt, completion) (NTP) or (prompt, winner, loser) (PO), chat-formatted and
   teacher-forced; only the first ``max_tokens`` completion tokens count.
3. NTP loss: -1/|y| sum_i log p(y_i | x, y_<i; h + s alpha v) (mean over completion tokens).
4. PO loss (uni-directional: each example steered with its own sign only, no reversed term):
   Delta = (beta+/|y_w|) log p(y_w | steered) - (1/|y_l|) log p(y_l | steered),
   beta+ = max(phi * (log p0(y_l|x) - log p0(y_w|x)), 1) with p0 the unsteered model (summed
   log-probs), loss = -log sigmoid(Delta).  (The notes write the phi term ambiguously; this reading
   keeps beta+ >= 1 and grows it when the unsteered model prefers the loser.)
5. Adam with a linear decay schedule, seeded shuffles; after every epoch the validation loss is
   measured and the vector with the lowest one is returned, with both loss curves.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from steerscope.analyses.trainable import frozen_except, trainable_steering
from steerscope.errors import DataError
from steerscope.extract.result import TrainResult
from steerscope.generation import IGNORE, completion_batch, sequence_logprobs
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.vector import Provenance, SteeringVector, Use, dataset_hash


def _logprobs(lm: LM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion length per row: ([batch], [batch])."""
    return sequence_logprobs(lm, batch), (batch["labels"][:, 1:] != IGNORE).sum(1)


def po_loss(lp_w: torch.Tensor, n_w: torch.Tensor, lp_l: torch.Tensor, n_l: torch.Tensor,
            ref_w: torch.Tensor, ref_l: torch.Tensor, phi: float) -> torch.Tensor:
    """Uni-directional RePS loss (pure): mean of -log sigmoid(beta+ lp_w/|y_w| - lp_l/|y_l|). All [batch]."""
    beta = torch.clamp(phi * (ref_l - ref_w), min=1.0).detach()
    delta = beta * lp_w / n_w.clamp_min(1) - lp_l / n_l.clamp_min(1)
    return -F.logsigmoid(delta).mean()


def _loss(lm: LM, kind: str, layer: int, v: torch.Tensor, rows: list[tuple[Any, ...]], alpha: float, max_tokens: int,
          phi: float) -> torch.Tensor:
    prompts = [r[0] for r in rows]
    scale = torch.tensor([alpha * r[-1] for r in rows], device=lm.device)
    if kind == "ntp":
        batch = completion_batch(lm, prompts, [r[1] for r in rows], max_tokens)
        with trainable_steering(lm, layer, v, scale):
            lp, n = _logprobs(lm, batch)
        return -(lp / n.clamp_min(1)).mean()
    bw = completion_batch(lm, prompts, [r[1] for r in rows], max_tokens)
    bl = completion_batch(lm, prompts, [r[2] for r in rows], max_tokens)
    with torch.no_grad():
        ref_w, _ = _logprobs(lm, bw)
        ref_l, _ = _logprobs(lm, bl)
    with trainable_steering(lm, layer, v, scale):
        lp_w, n_w = _logprobs(lm, bw)
        lp_l, n_l = _logprobs(lm, bl)
    return po_loss(lp_w, n_w, lp_l, n_l, ref_w, ref_l, phi)


def _train(lm: LM, kind: str, rows: list[tuple[Any, ...]], val: list[tuple[Any, ...]], layer: int, epochs: int, lr: float,
           batch_size: int, alpha: float, seed: int, max_tokens: int, phi: float,
           init: torch.Tensor | None, show_progress: bool) -> TrainResult:
    if not rows:
        raise DataError(f"{kind} training needs at least one example")
    gen = torch.Generator().manual_seed(seed)
    start = init.clone().float() if init is not None else torch.randn(lm.d_model, generator=gen) * 0.01
    v = torch.nn.Parameter(start.to(lm.device))
    opt = torch.optim.Adam([v], lr=lr)
    steps = epochs * math.ceil(len(rows) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))
    rng = random.Random(seed)
    train_loss: list[float] = []
    val_loss: list[float] = []
    best, best_epoch = (math.inf, start.clone()), -1
    with frozen_except(lm.model, [v]):
        for epoch in progress(range(epochs), desc=f"train {kind}", enabled=show_progress):
            order = rows[:]
            rng.shuffle(order)
            for i in range(0, len(order), batch_size):
                loss = _loss(lm, kind, layer, v, order[i : i + batch_size], alpha, max_tokens, phi)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                sched.step()
                train_loss.append(float(loss.detach()))
            if val:
                with torch.no_grad():
                    vl = [float(_loss(lm, kind, layer, v, val[i : i + batch_size], alpha, max_tokens, phi)) * len(
                        val[i : i + batch_size]) for i in range(0, len(val), batch_size)]
                val_loss.append(sum(vl) / len(val))
            current = val_loss[-1] if val else train_loss[-1]
            if current < best[0]:
                best, best_epoch = (current, v.detach().clone().cpu()), epoch
    prov = Provenance.for_model(lm, method=kind, positions="all", dataset_hash=dataset_hash([list(r) for r in rows]),
                                n_examples=len(rows), args={"layer": layer, "epochs": epochs, "lr": lr, "alpha": alpha,
                                                            "batch_size": batch_size, "seed": seed, "phi": phi,
                                                            "max_tokens": max_tokens, "best_epoch": best_epoch},
                                use=Use(layers=[layer], positions="all", alpha=float(alpha)))  # the scale it was trained at
    return TrainResult(vector=SteeringVector({layer: best[1]}, "resid_pre", prov), train_loss=train_loss,
                       val_loss=val_loss, best_epoch=best_epoch)


def train_ntp(lm: LM, prompts: Sequence[str], completions: Sequence[str], signs: Sequence[float], layer: int,
              val: tuple[Sequence[str], Sequence[str], Sequence[float]] | None = None, epochs: int = 10,
              lr: float = 0.01, batch_size: int = 6, alpha: float = 1.0, seed: int = 42, max_tokens: int = 64,
              init: torch.Tensor | None = None, show_progress: bool = False) -> TrainResult:
    """Train a steering vector with the next-token loss on target completions.

    Args:
        prompts, completions: the examples (completion = the text wanted under steering).
        signs: +1 (steer with +alpha v) or -1 (steer with -alpha v) per example.
        layer: resid_pre layer the vector is added at (all positions).
        val: optional (prompts, completions, signs) for per-epoch validation and selection.

    Returns:
        :class:`TrainResult` (vector at ``layer``, loss curves, best epoch).

    Example:
        >>> r = train_ntp(lm, harmless, refusals, [1.0] * len(harmless), layer=12, epochs=3)
        >>> r.vector[12].shape
    """
    rows = list(zip(prompts, completions, [float(s) for s in signs]))
    vrows = list(zip(*val)) if val else []
    return _train(lm, "ntp", rows, vrows, layer, epochs, lr, batch_size, alpha, seed, max_tokens, 0.0, init,
                  show_progress)


def train_po(lm: LM, prompts: Sequence[str], winners: Sequence[str], losers: Sequence[str], signs: Sequence[float],
             layer: int, val: tuple[Sequence[str], Sequence[str], Sequence[str], Sequence[float]] | None = None,
             epochs: int = 10, lr: float = 0.01, batch_size: int = 6, alpha: float = 1.0, seed: int = 42,
             max_tokens: int = 64, phi: float = 2e-2, init: torch.Tensor | None = None,
             show_progress: bool = False) -> TrainResult:
    """Train a steering vector with the uni-directional RePS preference loss (see module docstring).

    Example:
        >>> r = train_po(lm, prompts, refusals, answers, [1.0] * len(prompts), layer=12)
    """
    rows = list(zip(prompts, winners, losers, [float(s) for s in signs]))
    vrows = list(zip(*val)) if val else []
    return _train(lm, "po", rows, vrows, layer, epochs, lr, batch_size, alpha, seed, max_tokens, phi, init,
                  show_progress)
