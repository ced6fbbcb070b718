"""Run a model from block l up on residual streams of our choosing: one prefix, many suffixes.

Algorithm:
  1. Below the steering layer l, every steered, unsteered, interpolated or patched run of one
     teacher-forced batch is the same. :func:`prefix` runs one ordinary forward and records what
     the model passes to each block l, l+1, ... (the residual stream entering block l, the
     attention mask, rotary embeddings, position ids), through :func:`steerscope.hooks.block_inputs`.
  2. :func:`run_blocks` calls the model's own blocks l.. on any rows built from that batch: row r
     uses the mask and rotary embeddings of sample ``rows[r]``. Rows may join just before a later
     block (``inserts``), so that a row whose run differs from a cached one only from block L up
     is computed from block L only.
  3. :func:`logit_diff` reads m = sum over scored positions of logit(y_pos) - logit(y_neg) from the
     stream leaving the last block: the final norm, then two rows of the unembedding at the
     scored positions only, instead of all ``vocab`` logits at every position (and the final
     logit soft-capping c tanh(x / c) of Gemma 2 applied to those two logits).

Nothing is re-implemented: blocks, norms and the unembedding are the model's modules, called
with the arguments the model computed, and hooks from :func:`steerscope.hooks.attached` fire in
them as in a full forward. :func:`logit_diff` assumes the logits are the (soft-capped)
unembedding of the final normed stream (true of the families
:func:`steerscope.circuits.eap_ig.check_supported` admits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from steerscope.circuits.weights import softcap
from steerscope.hooks import BlockCall, Call, HookFn, attached, block_inputs
from steerscope.models.lm import LM
from steerscope.sites import Site

HookMap = dict["str | Site", "HookFn | list[HookFn]"]  # what :func:`steerscope.hooks.attached` takes


@dataclass
class Prefix:
    """The shared part of a batch's forward below block ``layer``, and that forward's end.

    ``resid`` [batch pos d_model] is the residual stream entering block ``layer`` (after any hook
    given to :func:`prefix`); ``calls[L]`` what block L >= ``layer`` was called with; ``final``
    [batch pos d_model] the stream leaving the last block in that same forward (for its metric).
    """

    layer: int
    resid: torch.Tensor
    calls: dict[int, BlockCall]
    final: torch.Tensor

    @property
    def n_samples(self) -> int:
        return int(self.resid.shape[0])


@torch.no_grad()
def prefix(lm: LM, inputs: Mapping[str, torch.Tensor], layer: int,
           hooks: HookMap | None = None) -> Prefix:
    """One ordinary forward of ``inputs`` that records the model's arguments to blocks ``layer``..

    Args:
        inputs: keyword arguments of the model (``input_ids``, ``attention_mask``, ``position_ids``).
        layer: the first block to record.
        hooks: extra ``{site: fn}`` hooks for this forward (e.g. to record node outputs).

    Example:
        >>> pre = prefix(lm, {"input_ids": ids, "attention_mask": attn}, layer=12)
        >>> m = logit_diff(lm, pre.final, torch.arange(len(ids)), y_pos, y_neg, mask)
    """
    end: dict[str, torch.Tensor] = {}

    def keep_final(x: torch.Tensor, _c: Call) -> None:
        end["final"] = x
    last: HookMap = {f"blocks.{lm.n_layers - 1}.resid_post": keep_final}
    with attached(lm, hooks or {}), attached(lm, last), block_inputs(lm, range(layer, lm.n_layers)) as calls:
        lm.model(**inputs, use_cache=False, logits_to_keep=1)  # the metric reads ``final``, not the logits
    return Prefix(layer, calls[layer].hidden, dict(calls), end["final"])


def _take(x: Any, rows: torch.Tensor, n: int) -> Any:
    """Index the batch axis of every per-sample tensor in ``x`` (tuples recursively) by ``rows``."""
    if isinstance(x, torch.Tensor):
        return x[rows] if x.dim() >= 2 and x.shape[0] == n else x
    if isinstance(x, tuple):
        return tuple(_take(y, rows, n) for y in x)
    return x


def run_blocks(lm: LM, pre: Prefix, hidden: torch.Tensor, rows: torch.Tensor, start: int | None = None,
               inserts: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``start``.. of the model on ``hidden`` [rows pos d_model], as the model would run them.

    Args:
        pre: from :func:`prefix` on the batch the rows come from.
        hidden: the residual stream entering block ``start`` (default ``pre.layer``), one row per run.
        rows: long [rows], the sample of each row (its mask, positions, rotary embeddings).
        inserts: ``{L: (hidden [r pos d_model], rows [r])}``: rows appended just before block L runs
            (L = n_layers: just before the end). Hooks at block L see them last.

    Returns:
        (the stream leaving the last block [all rows, pos, d_model], the sample of each row).

    Example:
        >>> h, rows = run_blocks(lm, pre, pre.resid, torch.arange(pre.n_samples))
    """
    start = pre.layer if start is None else start
    inserts = inserts or {}
    if min([start, *inserts]) < pre.layer:
        raise ValueError(f"the prefix starts at block {pre.layer}; cannot run block {min([start, *inserts])}")
    blocks, n = lm.blocks, pre.n_samples
    for layer in range(start, lm.n_layers + 1):
        if layer in inserts:
            h, r = inserts[layer]
            hidden, rows = torch.cat([hidden, h.to(hidden.dtype)]), torch.cat([rows, r])
        if layer == lm.n_layers:
            break
        call = pre.calls[layer]
        args = _take(call.args, rows, n)
        out = blocks[layer](hidden, *args, **{k: _take(v, rows, n) for k, v in call.kwargs.items()})
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden, rows


def logit_diff(lm: LM, resid: torch.Tensor, rows: torch.Tensor, y_pos: torch.Tensor, y_neg: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """m per row: sum over masked positions of logit(y_pos) - logit(y_neg). [rows]

    Args:
        resid: the stream leaving the last block [rows pos d_model] (before the final norm).
        rows: long [rows], the sample of each row; y_pos, y_neg, mask: [batch pos] per sample.
    """
    h = lm.final_norm(resid)
    unembed = lm.unembedding
    rows = rows.to(mask.device)
    r, t = mask[rows].nonzero(as_tuple=True)  # scored (row, position) pairs
    i = rows[r]
    w = lm.W_U()
    lp = (h[r, t] * w[y_pos[i, t]].to(h.dtype)).sum(-1)
    ln = (h[r, t] * w[y_neg[i, t]].to(h.dtype)).sum(-1)
    bias = getattr(unembed, "bias", None)
    if bias is not None:
        lp, ln = lp + bias[y_pos[i, t]].detach().to(h.dtype), ln + bias[y_neg[i, t]].detach().to(h.dtype)
    cap = softcap(lm)
    if cap is not None:
        lp, ln = cap * torch.tanh(lp / cap), cap * torch.tanh(ln / cap)
    return torch.zeros(len(rows), dtype=h.dtype, device=h.device).index_add(0, r, lp - ln)
