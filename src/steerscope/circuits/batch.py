"""Teacher-forced patch batches: steered greedy responses, their metric targets and masks.

Algorithm (paper A, §4, "Formulas"):
  1. Generate the steered greedy response (alpha, all positions) to each prompt.
  2. Teacher-force prompt + response, steered and unsteered; at every response position the
     greedy next tokens of the two runs are y_steer and y_base.
  3. The metric m = sum over scored positions of logit(y_steer) - logit(y_base), where scored
     means a response position (before the first end-of-sequence token) where y_steer != y_base.

Columns after the last scored position and leading all-padding columns cannot change m (causal
attention), so :func:`trim` drops them; samples with no scored position add nothing to any
score and :func:`scored_batches` skips them.
Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Formulas".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steerscope.generation import chat_batch, position_ids
from steerscope.models.lm import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector


@dataclass
class PatchBatch:
    """A teacher-forced batch with its metric targets. All tensors [batch pos].

    ``y_steer``/``y_base`` are the greedy next tokens predicted at each position by the steered
    and the unsteered model; ``mask`` marks scored positions (response, and tokens disagree).
    """

    ids: torch.Tensor
    attn: torch.Tensor
    pos_ids: torch.Tensor
    y_steer: torch.Tensor
    y_base: torch.Tensor
    mask: torch.Tensor
    texts: list[str] = field(default_factory=list)

    def rows(self, idx: slice | torch.Tensor | Sequence[int]) -> PatchBatch:
        """The samples ``idx`` (a slice, or indices) as a new batch.

        Example:
            >>> pb.rows([0, 2]).ids.shape[0]
            2
        """
        if isinstance(idx, slice):
            texts = self.texts[idx]
        else:
            idx = torch.as_tensor(idx, dtype=torch.long)
            texts = [self.texts[i] for i in idx.tolist() if i < len(self.texts)]
        return PatchBatch(self.ids[idx], self.attn[idx], self.pos_ids[idx], self.y_steer[idx], self.y_base[idx],
                          self.mask[idx], texts)

    def inputs(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for a teacher-forced forward of this batch."""
        return {"input_ids": self.ids, "attention_mask": self.attn, "position_ids": self.pos_ids}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch's tensors by field name (to store beside results; ``PatchBatch(**d)`` restores)."""
        return {k: getattr(self, k) for k in ("ids", "attn", "pos_ids", "y_steer", "y_base", "mask")}


def inputs(pb: PatchBatch) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a teacher-forced forward of ``pb``."""
    return pb.inputs()


def forward(lm: LM, pb: PatchBatch) -> torch.Tensor:
    """Teacher-forced logits [batch pos vocab] (position ids consistent with generation)."""
    out: torch.Tensor = lm.model(**pb.inputs()).logits
    return out


def metric(logits: torch.Tensor, pb: PatchBatch) -> torch.Tensor:
    """m per sample: sum over scored positions of logit(y_steer) - logit(y_base). [batch]"""
    ls = logits.gather(-1, pb.y_steer[..., None])[..., 0]
    lb = logits.gather(-1, pb.y_base[..., None])[..., 0]
    return ((ls - lb) * pb.mask.to(logits.dtype)).sum(-1)


def _response_mask(lm: LM, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """bool [batch pos]: positions whose logits predict a response token before the first EOS."""
    n = ids.shape[1]
    resp = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    resp[:, n_prompt - 1 : n - 1] = True  # logits at P-1 .. n-2 predict the response tokens
    eos = lm.tokenizer.eos_token_id
    gen = ids[:, n_prompt:]
    if eos is not None:  # stop scoring after the first end-of-sequence token
        done = (gen == eos).long().cumsum(1) - (gen == eos).long()
        resp[:, n_prompt - 1 : n - 1] &= done == 0
    return resp


@torch.no_grad()
def prepare(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, max_new_tokens: int = 32,
            chat: bool = True) -> PatchBatch:
    """Steered greedy responses, teacher-forced; greedy targets and the agreement mask.

    Args:
        prompts: user prompts (the chat template is applied when ``chat``).
        vector, alpha: the steering (all positions) that produces the responses.
        max_new_tokens: response length.

    Returns:
        A :class:`PatchBatch` with ``texts`` the decoded steered responses.

    Example:
        >>> pb = prepare(lm, ["How do I pick a lock?"], vec, alpha=-1.0, max_new_tokens=24)
    """
    enc = chat_batch(lm, prompts, chat=chat)
    P = enc["input_ids"].shape[1]
    with steering(lm, vector, alpha):
        ids = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    attn = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, P:])], 1)
    pb = PatchBatch(ids, attn, position_ids(attn), ids, ids, torch.zeros_like(ids, dtype=torch.bool))
    base = forward(lm, pb).argmax(-1)
    with steering(lm, vector, alpha):
        steer = forward(lm, pb).argmax(-1)
    pb.y_steer, pb.y_base = steer, base
    pb.mask = _response_mask(lm, ids, P) & (steer != base)
    pb.texts = lm.tokenizer.batch_decode(ids[:, P:], skip_special_tokens=True)
    return pb


def trim_columns(pb: PatchBatch) -> slice:
    """The columns that can change m: up to the last scored position (causal), from the first
    real token of any row (padding before it is masked everywhere)."""
    cols = pb.mask.any(0).nonzero()
    stop = int(cols.max()) + 1 if len(cols) else 1
    real = pb.attn.bool().any(0).nonzero()
    return slice(min(int(real.min()), stop - 1) if len(real) else 0, stop)


def trim(pb: PatchBatch) -> PatchBatch:
    """``pb`` restricted to :func:`trim_columns` (every score and effect is unchanged)."""
    sl = trim_columns(pb)
    return PatchBatch(pb.ids[:, sl], pb.attn[:, sl], pb.pos_ids[:, sl], pb.y_steer[:, sl], pb.y_base[:, sl],
                      pb.mask[:, sl], pb.texts)


def scored_batches(pb: PatchBatch, batch_size: int) -> list[torch.Tensor]:
    """Sample indices in batches of ``batch_size``, skipping samples with no scored position
    (their m is 0 in every run, so they add nothing to any score or effect)."""
    idx = pb.mask.any(1).nonzero()[:, 0].cpu()
    return list(torch.split(idx, batch_size))
