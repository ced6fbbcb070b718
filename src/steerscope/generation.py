"""Batched text generation with the chat template applied, optionally steered."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from steerscope.errors import SteerscopeError
from steerscope.models.lm import LM
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
    backend: str = "hf",
) -> list[str]:
    """Generate completions for ``prompts`` (chat template applied), steered if ``vector`` is given.

    Greedy by default. Left padding; the returned strings are the new text only.
    ``backend="vllm"`` runs the same request on a cached vLLM engine (see docs/vllm.md): greedy
    output is token-for-token the HF one; positions ``all``/``prompt``/``generated`` only.

    Example:
        >>> generate(lm, ["How do I bake bread?"], vector=vec, alpha=4.0, max_new_tokens=32)
    """
    if backend not in ("hf", "vllm"):
        raise SteerscopeError(f"backend {backend!r} not known; use 'hf' or 'vllm'")
    if seed is not None:
        torch.manual_seed(seed)
    texts = [lm.format_chat(p, system) if chat else p for p in prompts]
    if backend == "vllm":
        from steerscope.backends import vllm

        if not isinstance(positions, str):
            raise SteerscopeError("backend='vllm' takes positions all, prompt or generated; use backend='hf'")
        return vllm.generate(lm, texts, vector, alpha, max_new_tokens, positions, do_sample, temperature, seed, chat)
    out: list[str] = []
    starts = range(0, len(texts), batch_size)
    for i in progress(starts, desc="generate", enabled=show_progress):
        batch = lm.tokenize(texts[i : i + batch_size], padding_side="left", templated=chat)
        ctx = steering(lm, vector, alpha, positions) if vector is not None else nullcontext()
        gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=lm.tokenizer.pad_token_id)
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
        with ctx, torch.no_grad():
            ids = lm.model.generate(**batch, **gen_kwargs)
        new = ids[:, batch["input_ids"].shape[1]:]
        out += lm.tokenizer.batch_decode(new, skip_special_tokens=True)
    return out
