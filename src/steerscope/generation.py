"""Batched text generation with the chat template applied, optionally steered."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from steerscope.errors import DataError, SteerscopeError
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.steer import Positions, steering
from steerscope.vector import SteeringVector


def generate(
    lm: LM,
    prompts: Sequence[str],
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    max_new_tokens: int = 64,
    positions: Positions = "all",
    batch_size: int = 16,
    system: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    show_progress: bool = False,
) -> list[str]:
    """Generate completions for ``prompts`` (chat template applied), steered if ``vector`` is given.

    Greedy by default. Left padding; the returned strings are the new text only.

    Example:
        >>> generate(lm, ["How do I bake bread?"], vector=vec, alpha=4.0, max_new_tokens=32)
    """
    if seed is not None:
        torch.manual_seed(seed)
    texts = [lm.format_chat(p, system) if chat else p for p in prompts]
    out: list[str] = []
    starts = range(0, len(texts), batch_size)
    for i in progress(starts, desc="generate", enabled=show_progress):
        batch = lm.tokenize(texts[i : i + batch_size], padding_side="left", templated=chat)
        check_context(lm, batch["input_ids"].shape[1], max_new_tokens)
        ctx = steering(lm, vector, alpha, positions) if vector is not None else nullcontext()
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=lm.tokenizer.pad_token_id, logits_processor=_nan_guard())
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        with ctx, torch.no_grad():
            ids = lm.model.generate(**batch, **gen_kwargs)
        new = ids[:, batch["input_ids"].shape[1]:]
        out += lm.tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def context_length(lm: LM) -> int | None:
    """The model's maximum number of positions (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(lm.config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_context(lm: LM, n_prompt: int, max_new_tokens: int) -> None:
    """Raise :class:`DataError` before generating when prompt + new tokens exceed the context length."""
    n_ctx = context_length(lm)
    if n_ctx is not None and n_prompt + max_new_tokens > n_ctx:
        raise DataError(f"a prompt of {n_prompt} tokens plus max_new_tokens {max_new_tokens} exceeds {lm.name}'s "
                        f"context of {n_ctx} positions; shorten the prompt or lower --max-new-tokens")


def _nan_guard() -> object:
    """A logits processor that stops generation with one clear error on NaN/inf logits (cheap: one
    reduction per step), instead of silently returning empty or garbage text."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class NaNGuard(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if torch.isnan(scores).any() or torch.isposinf(scores).any():
                raise SteerscopeError("the model produced NaN/inf logits (overflow): lower alpha, use float32, "
                                      "or check the vector")
            return scores

    return LogitsProcessorList([NaNGuard()])
