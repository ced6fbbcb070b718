"""The objective ``tune`` maximises: the behaviour effect minus a KL penalty.

Algorithm (one configuration = layer, alpha, positions):
  1. Effect, by default teacher-forced (one forward per configuration, no generation): for pair i
     with prompt c_i and continuations y+_i, y-_i,
        effect_i = [log p_s(y+_i | c_i) - log p_s(y-_i | c_i)] - [log p_0(y+_i | c_i) - log p_0(y-_i | c_i)]
     where log p(y | c) sums the log-probabilities of y's tokens, p_s is the steered model and p_0 the
     unsteered one: how many nats of log-odds steering moves from the negative continuation to the
     positive one. c_i is the chat-formatted shared prompt; without one, the chat template's lead-in
     (the text before the user's message; the BOS or EOS token for a model without a template) and y
     is the whole example. Why: it needs no classifier and works for any contrast data; it is the
     free-text form of CAA's A/B log-odds; subtracting the unsteered log-odds removes each pair's
     own baseline, so the figure is the change steering causes. The prompt runs as one call and the
     continuation as a second call over its KV cache, so ``positions`` means what it means in
     ``generate``: "prompt" steers c only, "generated" y only, "all" both.
     With a scorer (a callable texts -> scores or a name of ``explain.scorers``), effect_i is the
     scorer's value on the steered greedy response to the pair's prompt minus on the unsteered one
     (prompt: the shared prompt, else the negative example, which steering should move).
  2. Damage: KL(P_0 || P_s) of the next-token distribution at every position of the shipped neutral
     prompts and of their unsteered greedy continuations (``Settings.kl_tokens`` tokens, steered as
     generated text), pooled; its 95 % quantile (the worst 5 %, as ``explain``'s dose) is ``kl_worst5``.
  3. objective = mean effect - ``kl_penalty`` * max(0, kl_worst5 - kl_budget)  (:func:`penalized`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from steerscope.explain.dose import kl_per_position
from steerscope.generation import generate
from steerscope.models.lm import LM
from steerscope.steer import Positions, steering
from steerscope.tune.data import Pair
from steerscope.tune.records import Settings
from steerscope.vector import SteeringVector

ScoreFn = Callable[[Sequence[str]], Any]
_SENTINEL = "\x00steerscope-tune\x00"


def penalized(effect: float, kl_worst5: float, kl_budget: float, weight: float) -> tuple[float, float]:
    """(objective, penalty) with penalty = weight * max(0, kl_worst5 - kl_budget).

    Example:
        >>> penalized(2.0, 1.5, 1.0, 10.0)
        (-3.0, 5.0)
    """
    penalty = weight * max(0.0, kl_worst5 - kl_budget)
    return effect - penalty, penalty


def _ids(lm: LM, text: str) -> list[int]:
    return [int(i) for i in lm.tokenizer(text, add_special_tokens=False)["input_ids"]]


def lead_in(lm: LM) -> list[int]:
    """Token ids of the chat template's text before the user's message (BOS/EOS without a template)."""
    if lm.has_chat_template:
        ids = _ids(lm, lm.format_chat(_SENTINEL).split(_SENTINEL)[0])
        if ids:
            return ids
    tok = lm.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return [int(start)]


def prompt_ids(lm: LM, prompt: str) -> list[int]:
    """The chat-formatted prompt's token ids (the template brings its own special tokens)."""
    if lm.has_chat_template:
        return _ids(lm, lm.format_chat(prompt))
    return [int(i) for i in lm.tokenizer(prompt)["input_ids"]]


def rows(lm: LM, pairs: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
    """Teacher-forcing rows (prompt ids, continuation ids): 2i the positive, 2i+1 the negative of pair i."""
    lead = lead_in(lm)
    out = []
    for p in pairs:
        c = prompt_ids(lm, p.prompt) if p.prompt is not None else lead
        out += [(c, _ids(lm, p.positive)), (c, _ids(lm, p.negative))]
    return out


def _pad(seqs: Sequence[list[int]], pad: int, left: bool, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def forward(lm: LM, batch: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Prompt call (left-padded) then continuation call (right-padded) over its KV cache.

    Returns:
        ``c_logits`` [batch c_pos vocab], ``c_mask``, ``y_ids``, ``y_logits`` [batch y_pos vocab], ``y_mask``.
    """
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    c, cm = _pad([r[0] for r in batch], pad, True, lm.device)
    out = lm.model(input_ids=c, attention_mask=cm, position_ids=(cm.cumsum(1) - 1).clamp_min(0), use_cache=True)
    res = {"c_logits": out.logits.float(), "c_mask": cm}
    if max(len(r[1]) for r in batch) == 0:
        return res
    y, ym = _pad([r[1] for r in batch], pad, False, lm.device)
    pos = cm.sum(1, keepdim=True) + torch.arange(y.shape[1], device=y.device)[None]
    out2 = lm.model(input_ids=y, attention_mask=torch.cat([cm, ym], 1), position_ids=pos, use_cache=True,
                    **{lm.cache_kw: lm.cache_of(out)})
    return res | {"y_ids": y, "y_logits": out2.logits.float(), "y_mask": ym}


def logprob(fw: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(y | c) per row [batch]: the sum over y's real tokens (the first predicted by c's last position)."""
    pred = torch.cat([fw["c_logits"][:, -1:], fw["y_logits"][:, :-1]], 1).log_softmax(-1)
    tok = pred.gather(-1, fw["y_ids"][..., None])[..., 0]
    return (tok * fw["y_mask"]).sum(1).double().cpu()


def kl_rows(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """KL(P_base || P_other) at every real position of each row (prompt, then continuation)."""
    out = []
    for j in range(len(base["c_mask"])):
        parts = [kl_per_position(base["c_logits"][j:j + 1], other["c_logits"][j:j + 1], base["c_mask"][j:j + 1])]
        if "y_mask" in base:
            parts.append(kl_per_position(base["y_logits"][j:j + 1], other["y_logits"][j:j + 1], base["y_mask"][j:j + 1]))
        out.append(torch.cat(parts).double().cpu().numpy())
    return out


@torch.no_grad()
def neutral_rows(lm: LM, prompts: Sequence[str], n_tokens: int, batch_size: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, its unsteered greedy continuation of up to ``n_tokens`` ids, cut at EOS) per prompt."""
    out: list[tuple[list[int], list[int]]] = []
    stop = {lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id} - {None}
    for i in range(0, len(prompts), batch_size):
        cs = [prompt_ids(lm, p) for p in prompts[i:i + batch_size]]
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        c, cm = _pad(cs, pad, True, lm.device)
        new = lm.model.generate(input_ids=c, attention_mask=cm, max_new_tokens=n_tokens, do_sample=False,
                                pad_token_id=pad)[:, c.shape[1]:] if n_tokens > 0 else c[:, :0]
        for ids, row in zip(cs, new.tolist()):
            cut = next((k for k, t in enumerate(row) if t in stop), len(row))
            out.append((ids, row[:cut]))
    return out


class Evaluator:
    """Scores configurations on one split: its pairs and neutral prompts (unsteered baselines cached).

    Args:
        lm: the model. vector: the extracted vector (every searched layer).
        pairs: the split's contrast pairs. neutral: the split's neutral prompts.
        scorer: None for the teacher-forced log-odds, else a callable texts -> scores.
    """

    def __init__(self, lm: LM, vector: SteeringVector, pairs: Sequence[Pair], neutral: Sequence[str],
                 scorer: ScoreFn | None, settings: Settings) -> None:
        self.lm, self.vector, self.pairs, self.scorer, self.st = lm, vector, list(pairs), scorer, settings
        self.neutral = neutral_rows(lm, neutral, settings.kl_tokens, settings.batch_size)
        self.rows = rows(lm, self.pairs) if scorer is None else []
        self.prompts = [p.prompt if p.prompt is not None else p.negative for p in self.pairs]
        self._base_kl = [forward(lm, b) for b in self._batches(self.neutral)]
        self._base: np.ndarray | None = None

    def _batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        bs = self.st.batch_size
        return (items[i:i + bs] for i in range(0, len(items), bs))

    def _steer(self, layer: int, alpha: float, positions: Positions) -> Any:
        return steering(self.lm, self._one(layer), alpha, positions)

    def kl(self, layer: int, alpha: float, positions: Positions) -> list[np.ndarray]:
        """KL per position of each neutral prompt under the configuration."""
        out: list[np.ndarray] = []
        for base, batch in zip(self._base_kl, self._batches(self.neutral)):
            with self._steer(layer, alpha, positions):
                out += kl_rows(base, forward(self.lm, batch))
        return out

    def _one(self, layer: int) -> SteeringVector:
        return SteeringVector({layer: self.vector[layer]}, self.vector.site)

    def _raw(self, idx: Sequence[int], steer: tuple[int, float, Positions] | None) -> np.ndarray:
        """Per pair of ``idx``: the log-odds (teacher-forced) or the scorer's value, steered or not."""
        if self.scorer is not None:
            kw: dict[str, Any] = {} if steer is None else {"vector": self._one(steer[0]), "alpha": steer[1],
                                                            "positions": steer[2]}
            texts = generate(self.lm, [self.prompts[i] for i in idx], max_new_tokens=self.st.gen_tokens,
                             batch_size=self.st.batch_size, **kw)
            return np.asarray(self.scorer(texts), float)
        lp = []
        for batch in self._batches([r for i in idx for r in self.rows[2 * i:2 * i + 2]]):
            with self._steer(*steer) if steer is not None else nullcontext():
                lp.append(logprob(forward(self.lm, batch)))
        both = torch.cat(lp).numpy().reshape(-1, 2)
        return np.asarray(both[:, 0] - both[:, 1], float)

    def effect(self, layer: int, alpha: float, positions: Positions, idx: Sequence[int]) -> np.ndarray:
        """effect_i of each pair in ``idx`` (module docstring, step 1)."""
        if self._base is None:
            self._base = self._raw(range(len(self.pairs)), None)
        out: np.ndarray = self._raw(idx, (layer, alpha, positions)) - self._base[list(idx)]
        return out
