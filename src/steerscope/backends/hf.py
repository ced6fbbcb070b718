"""The Hugging Face engine: ``model.generate`` in this process, any intervention.

1. Requests are grouped by what one ``generate`` call must share: the sampling options (seed
   included), whether the text is templated, and the kind of intervention -- one context factory, or
   additions at one ``positions`` setting (vectors and alphas may differ per row: per-row steering).
   Unsteered rows join the additions' group with alpha 0 (an exact no-op), or form their own.
2. Each group is cut into batches. With ``batch_size`` set: batches of that many rows in request order.
   By default (``batch_size=None``) a group that fits ``token_budget`` (rows x (longest prompt + new
   tokens)) is one batch in request order; a larger one is sorted by prompt length (less padding) and
   packed into batches that each fit the budget, and the completions come back in request order. One
   ``generate`` call on many rows reads the weights once per step for all of them, so a fixed 16 split a
   32-prompt request into two calls that took about 40 % longer than one (SmolLM2-135M, 64 tokens, CPU:
   15.5 vs 11.3 s, benchmarks/bench_hf.py).
   A batch of additions that all share one vector and alpha is steered with that vector, a
   context-factory batch runs inside ``factory()``.
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

TOKEN_BUDGET = 8192  # rows x (longest prompt + new tokens) per generate call when batch_size is None
BYTE_SLACK = 8  # tokens a prompt may have beyond its UTF-8 bytes (BOS/EOS, a dummy-prefix space)


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
        batch_size: rows per ``generate`` call (None: packed to ``token_budget``, see the module docstring).
        show_progress: a progress bar over the batches.
        token_budget: with ``batch_size=None``, the most rows x (longest prompt + new tokens) per call.

    Example:
        >>> HFEngine().generate(lm, [Request("Hi"), Request("Hi", Addition(vec, alpha=4.0))])
    """

    batch_size: int | None = None
    show_progress: bool = False
    name: str = "hf"
    token_budget: int = TOKEN_BUDGET

    def generate(self, lm: LM, requests: Sequence[Request]) -> list[str]:
        """One completion (new text only) per request, in request order."""
        out: list[str] = [""] * len(requests)
        texts = [_text(lm, r) for r in requests]
        jobs = []
        for idx in groups(requests):
            procs = sampler(requests[idx[0]])  # one random stream across the group's batches
            jobs += [(rows, procs) for rows in self.batches(lm, idx, texts, requests[idx[0]])]
        for rows, procs in progress(jobs, desc="generate", enabled=self.show_progress):
            batch = [requests[i] for i in rows]
            done = generate_batch(lm, [texts[i] for i in rows], batch[0].template != "none",
                                  batch[0].max_new_tokens, procs, batch_context(lm, batch))
            for i, t in zip(rows, done):
                out[i] = t
        return out

    def batches(self, lm: LM, idx: list[int], texts: Sequence[str], first: Request) -> list[list[int]]:
        """The rows of one group cut into ``generate`` calls (see the module docstring)."""
        if self.batch_size is not None:
            return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        # a token covers at least one UTF-8 byte (a few more for special tokens and a leading-space marker):
        # when that bound fits, the group is one call and is not tokenized twice (generate_batch tokenizes it)
        bound = max(len(texts[i].encode()) for i in idx) + BYTE_SLACK
        if len(idx) * (bound + first.max_new_tokens) <= self.token_budget:
            return [list(idx)]
        enc = lm.tokenize([texts[i] for i in idx], templated=first.template != "none")
        lengths = [int(n) for n in enc["attention_mask"].sum(1)]
        return pack(idx, lengths, first.max_new_tokens, self.token_budget)


def pack(idx: Sequence[int], lengths: Sequence[int], new_tokens: int, budget: int) -> list[list[int]]:
    """Rows ``idx`` (prompt ``lengths`` in tokens) in batches of at most ``budget`` rows x (longest prompt +
    ``new_tokens``): all in one batch in their order when they fit, else sorted by length and packed
    (a row that alone exceeds the budget gets a batch of its own).

    Example:
        >>> pack([0, 1, 2], [5, 30, 6], 10, 64)
        [[0, 2], [1]]
    """
    if len(idx) * (max(lengths, default=0) + new_tokens) <= budget:
        return [list(idx)]
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for n, i in sorted(zip(lengths, idx)):
        if cur and (len(cur) + 1) * (max(longest, n) + new_tokens) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return out + [cur] if cur else out


def _text(lm: LM, r: Request) -> str:
    """The text ``generate`` sees for ``r``: chat-formatted when its template is applied."""
    return lm.format_chat(r.prompt, r.system) if r.template == "apply" else r.prompt
