"""The Hugging Face engine: ``model.generate`` in this process, any intervention.

1. Requests are grouped by what one ``generate`` call must share: the sampling options (seed
   included), whether the text is templated, and the kind of intervention -- one context factory, or
   additions at one ``positions`` setting (vectors and alphas may differ per row: per-row steering).
   Unsteered rows join the additions' group with alpha 0 (an exact no-op), or form their own.
2. Each group is cut into batches of ``batch_size`` in request order; a batch of additions that all
   share one vector and alpha is steered with that vector, a context-factory batch runs inside
   ``factory()``.
3. Sampling draws from one :class:`~steerscope.generation.SeededSampler` per group, so the global RNG
   is never touched and a group's tokens are those of ``torch.manual_seed(seed)`` then HF sampling.

Example:
    >>> HFEngine(batch_size=8).generate(lm, [Request("Hi", bias.active, do_sample=True, seed=1)])
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

from steerscope.backends.base import Addition, Request, groups
from steerscope.generation import SeededSampler, generate_batch
from steerscope.models.lm import LM
from steerscope.progress import progress
from steerscope.steer import steering


def batch_context(lm: LM, batch: Sequence[Request]) -> ContextManager[Any]:
    """The intervention of one batch: its context factory's context, one shared addition, or per-row additions."""
    adds = [r.intervention for r in batch if isinstance(r.intervention, Addition)]
    if not adds:
        iv = batch[0].intervention
        return iv() if iv is not None else nullcontext()  # type: ignore[operator]
    a0 = adds[0]
    if len(adds) == len(batch) and all(a.vector is a0.vector and a.alpha == a0.alpha for a in adds):
        return steering(lm, a0.vector, a0.alpha, a0.positions, condition=a0.condition)
    rows = [r.intervention if isinstance(r.intervention, Addition) else Addition(a0.vector, 0.0) for r in batch]
    return steering(lm, [a.vector for a in rows], [a.alpha for a in rows], a0.positions, condition=a0.condition)


def sampler(r: Request) -> list[Any]:
    """The logits processors that turn greedy decoding into ``r``'s sampling (none when greedy)."""
    if not r.do_sample:
        return []
    if r.top_k <= 0 and r.top_p >= 1.0:
        return [SeededSampler(r.temperature, r.seed)]
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = [TemperatureLogitsWarper(r.temperature)] if r.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(r.top_k)] if r.top_k > 0 else []
    warpers += [TopPLogitsWarper(r.top_p)] if r.top_p < 1.0 else []
    return warpers + [SeededSampler(1.0, r.seed)]  # HF's order: temperature, top-k, top-p, then the draw


@dataclass
class HFEngine:
    """Hugging Face ``generate`` with left-padded batches of ``batch_size`` (see the module docstring).

    Args:
        batch_size: rows per ``generate`` call.
        show_progress: a progress bar over the batches.

    Example:
        >>> HFEngine().generate(lm, [Request("Hi"), Request("Hi", Addition(vec, alpha=4.0))])
    """

    batch_size: int = 16
    show_progress: bool = False
    name: str = "hf"

    def generate(self, lm: LM, requests: Sequence[Request]) -> list[str]:
        """One completion (new text only) per request, in request order."""
        out: list[str] = [""] * len(requests)
        jobs = []
        for idx in groups(requests):
            procs = sampler(requests[idx[0]])  # one random stream across the group's batches
            jobs += [(idx[i : i + self.batch_size], procs) for i in range(0, len(idx), self.batch_size)]
        for rows, procs in progress(jobs, desc="generate", enabled=self.show_progress):
            batch = [requests[i] for i in rows]
            texts = [lm.format_chat(r.prompt, r.system) if r.template == "apply" else r.prompt for r in batch]
            done = generate_batch(lm, texts, batch[0].template != "none", batch[0].max_new_tokens, procs,
                                  batch_context(lm, batch))
            for i, t in zip(rows, done):
                out[i] = t
        return out
