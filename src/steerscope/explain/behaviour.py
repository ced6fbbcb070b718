"""The card's behaviour metric (paper A's, behaviour-agnostic) and "effect retained".

Algorithm:
  1. Generate the steered greedy response (alpha * s at resid_pre[l], every position) and
     teacher-force prompt + response (:func:`steerscope.circuits.prepare`). Per response
     position, m_t = logit(steered greedy token) - logit(base greedy token); positions where both
     greedy tokens agree are masked; m = sum_t m_t per prompt.
  2. Any intervention X (an ablation, a sparsified or perturbed vector) is run teacher-forced on
     the same tokens; its effect retained = (mean m_X - mean m_base) / (mean m_steer - mean m_base):
     1 = as steered, 0 = as unsteered.
  3. QK / OV frozen in one forward: batch = [base rows; steered rows], per-row alphas [0, alpha];
     the steered rows get the base rows' queries and keys (QK: same attention probabilities) or
     values (OV), the sites :mod:`steerscope.analyses.frozen` uses. svv / MLP removal use
     :func:`steerscope.analyses.frozen.ablation_hooks`.
  4. For generation, "tokens reproduced" = the fraction of the steered continuation's positions
     (up to its end of sequence) at which another continuation has the same token.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from steerscope import circuits as C
from steerscope.analyses import frozen as F
from steerscope.hooks import attached
from steerscope.models.load import LM
from steerscope.sites import Site
from steerscope.steer import steering
from steerscope.vector import SteeringVector


@dataclass
class Behaviour:
    """The reference teacher-forced batch and its metric per prompt, steered and unsteered."""

    pb: C.PatchBatch
    m_steer: torch.Tensor  # [n]
    m_base: torch.Tensor  # [n]

    @property
    def gap(self) -> float:
        """mean m_steer - mean m_base (the effect to explain)."""
        return float(self.m_steer.mean() - self.m_base.mean())

    def retained(self, m: torch.Tensor) -> float:
        """Effect retained by a run with metric ``m`` [n]: 1 = steered, 0 = unsteered (nan if no gap)."""
        gap = self.gap
        return float((m.mean() - self.m_base.mean()) / gap) if abs(gap) > 1e-9 else float("nan")

    def tensors(self) -> dict[str, Any]:
        pb = self.pb
        return {"batch": {k: getattr(pb, k) for k in ("ids", "attn", "pos_ids", "y_steer", "y_base", "mask")},
                "m_steer": self.m_steer, "m_base": self.m_base}

    @classmethod
    def from_tensors(cls, t: dict[str, Any], texts: Sequence[str] = ()) -> Behaviour:
        return cls(C.PatchBatch(**t["batch"], texts=list(texts)), t["m_steer"], t["m_base"])


@torch.no_grad()
def metric_of(lm: LM, pb: C.PatchBatch, vector: SteeringVector | None, alpha: float,
              hooks: Callable[[], Mapping[Any, Any]] | None = None, batch_size: int = 8) -> torch.Tensor:
    """m per prompt [n] of the teacher-forced batch, steered by ``alpha * vector`` (None: unsteered)
    with extra hooks (a factory called per batch, registered after the steering hook)."""
    out = []
    for i in range(0, pb.ids.shape[0], batch_size):
        sub = pb.rows(slice(i, i + batch_size))
        with ExitStack() as st:
            if vector is not None:
                st.enter_context(steering(lm, vector, alpha))
            if hooks is not None:
                st.enter_context(attached(lm, hooks()))
            out.append(C.metric(C.forward(lm, sub).float(), sub))
    return torch.cat(out).cpu()


@torch.no_grad()
def frozen_metric(lm: LM, pb: C.PatchBatch, vector: SteeringVector, alpha: float, mode: str,
                  batch_size: int = 8) -> torch.Tensor:
    """m per prompt [n] of the steered teacher-forced run with ``mode`` in qk / ov / svv / mlp ablated."""
    if mode in ("svv", "mlp"):
        return metric_of(lm, pb, vector, alpha, lambda: F.ablation_hooks(lm, vector, alpha, mode), batch_size)
    layer0 = vector.layers[0]
    sites = F.QK_SITES if mode == "qk" else ("attn.v",)
    out = []
    for i in range(0, pb.ids.shape[0], batch_size):
        sub = pb.rows(slice(i, i + batch_size))
        b = sub.ids.shape[0]
        copy: dict[str | Site, Any] = {f"blocks.{layer}.{site}": (lambda x, _c, b=b: F.copy_base_rows(x, b))
                                       for layer in range(layer0, lm.n_layers) for site in sites}

        def twice(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t])
        two = C.PatchBatch(twice(sub.ids), twice(sub.attn), twice(sub.pos_ids), twice(sub.y_steer),
                           twice(sub.y_base), twice(sub.mask))
        with steering(lm, vector, [0.0] * b + [alpha] * b), attached(lm, copy):
            out.append(C.metric(C.forward(lm, two).float(), two)[b:])
    return torch.cat(out).cpu()


def build(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, n_tokens: int,
          batch_size: int = 8) -> Behaviour:
    """The reference batch (steered greedy responses of ``n_tokens``) and m steered / unsteered.

    Example:
        >>> beh = build(lm, prompts, vec, alpha=4.0, n_tokens=24)
        >>> beh.retained(beh.m_steer)  # 1.0
    """
    pb = C.prepare(lm, list(prompts), vector, alpha, max_new_tokens=n_tokens)
    return Behaviour(pb, metric_of(lm, pb, vector, alpha, batch_size=batch_size),
                     metric_of(lm, pb, None, 0.0, batch_size=batch_size))


def tokens_reproduced(steered: torch.Tensor, other: torch.Tensor, eos: int | None, pad: int | None) -> float:
    """Fraction of the steered continuation's positions (through its first EOS) where ``other``
    has the same token. steered, other: [batch new] ids (padded after EOS)."""
    n = max(steered.shape[1], other.shape[1])
    fill = -1 if pad is None else pad

    def widen(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_full((x.shape[0], n - x.shape[1]), fill)], 1)
    s, o = widen(steered), widen(other)
    live = torch.ones_like(s, dtype=torch.bool)
    if eos is not None:  # count through the first EOS, not the padding after it
        hit = (s == eos).long()
        live = (hit.cumsum(1) - hit) == 0
    return float(((s == o) & live).sum()) / max(int(live.sum()), 1)
