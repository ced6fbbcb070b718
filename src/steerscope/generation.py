"""Batches of chat-formatted text, teacher-forced log-probs, and batched generation (optionally steered).

- :func:`chat_batch` — "format chat, tokenize with left padding": the prompt batch every forward
  pass and ``generate`` call starts from.
- :func:`completion_batch` — (prompt, completion) rows, right-padded, labels on the completion only.
- :func:`sequence_logprobs` — summed log p of the labelled tokens of such a batch (one forward pass).
- :func:`generate` — greedy or sampled completions through an engine (:mod:`steerscope.backends.base`);
  on HF, sampling draws from a ``torch.Generator`` seeded by ``seed`` (:class:`SeededSampler`), so the
  global RNG is never touched, and a seed gives the same tokens as seeding the global RNG and sampling
  with ``model.generate`` did.
- :func:`generate_batch` — one HF ``generate`` call on a batch of texts, what the HF engine runs per batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Mapping, Sequence

import torch

from steerscope.conditional.condition import Gate
from steerscope.errors import DataError, SteerscopeError
from steerscope.models.lm import LM
from steerscope.steer import Positions, VectorLike, as_vectors

IGNORE = -100  # label of tokens that do not count


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """``texts`` as a list; a bare string is one text (never one text per character).

    Example:
        >>> as_texts("Hi there")
        ['Hi there']
    """
    return [texts] if isinstance(texts, str) else list(texts)


def chat_batch(lm: LM, prompts: str | Sequence[str], system: str | None = None, chat: bool = True) -> Any:
    """Chat-format ``prompts`` (when ``chat``; else they are used as they are) and tokenize them with left padding.

    Args:
        lm: the model.
        prompts: user messages (or raw texts with ``chat=False``); a bare string is one prompt.
        system: optional system message.
        chat: apply the chat template.

    Returns:
        The tokenizer's batch (``input_ids``, ``attention_mask`` [batch pos]) on ``lm.device``.

    Example:
        >>> enc = chat_batch(lm, ["Hi", "How are you?"])
        >>> lm.model(**enc).logits.shape  # [2 pos vocab]
    """
    texts = [lm.format_chat(p, system) if chat else p for p in as_texts(prompts)]
    return lm.tokenize(texts, padding_side="left", templated=chat)


def completion_batch(lm: LM, prompts: str | Sequence[str], completions: str | Sequence[str],
                     max_tokens: int | None = None, system: str | None = None) -> dict[str, torch.Tensor]:
    """Right-padded chat-formatted (prompt + completion) rows; labels only on completion tokens.

    Args:
        prompts, completions: one completion per prompt (a bare string is one prompt / completion).
        max_tokens: keep the first ``max_tokens`` completion tokens (None: all).
        system: optional system message.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``IGNORE`` = -100 off the completion), each [batch pos].

    Example:
        >>> b = completion_batch(lm, ["2 + 2?"], ["4"])
        >>> lp = sequence_logprobs(lm, b)  # [1]
    """
    tok = lm.tokenizer
    rows, labels = [], []
    for p, c in zip(as_texts(prompts), as_texts(completions)):
        pid = tok(lm.format_chat(p, system), add_special_tokens=not lm.has_chat_template)["input_ids"]
        cid = tok(c, add_special_tokens=False)["input_ids"][:max_tokens]
        rows.append(pid + cid)
        labels.append([IGNORE] * len(pid) + cid)
    n = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    lab = torch.tensor([r + [IGNORE] * (n - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device), "labels": lab.to(lm.device)}


def sequence_logprobs(lm: LM, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t log p(labels_t | tokens before t) per row, teacher-forced; gradients flow to active parameters.

    Works for any padding: position ids follow the attention mask, and only the columns from the
    first labelled one on reach the LM head.

    Args:
        batch: ``input_ids``, ``attention_mask`` and ``labels`` [batch pos] (``IGNORE`` where a token does not
            count), e.g. from :func:`completion_batch`.

    Returns:
        [batch] summed log-probs (float32, or float64 for a float64 model).

    Example:
        >>> lp = sequence_logprobs(lm, completion_batch(lm, prompts, answers))
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    counted = labels[:, 1:] != IGNORE  # position t-1 predicts token t
    if not bool(counted.any()):
        return torch.zeros(ids.shape[0], device=ids.device)
    first = int(counted.any(0).nonzero()[0])  # first predicting column that matters
    pos = position_ids(mask)
    keep = ids.shape[1] - first
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
    # out.logits[:, :-1] predicts tokens first+1 ...
    return summed_logprobs(out.logits[:, :-1], labels[:, first + 1:], counted[:, first:])


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as ``generate`` computes them (pads at 0). [batch pos]

    Example:
        >>> position_ids(torch.tensor([[0, 1, 1], [1, 1, 1]]))
        tensor([[0, 0, 1],
                [0, 1, 2]])
    """
    return (attn.long().cumsum(-1) - 1).clamp(min=0)


def summed_logprobs(logits: torch.Tensor, target: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Σ_t log softmax(logits_t)[target_t] over the counted positions, per row (float32, or float64 logits kept).

    Args:
        logits: [batch T vocab] predictions of ``target``.
        target: [batch T] token ids (any value where not counted).
        counted: [batch T] which positions count.

    Example:
        >>> summed_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]), torch.tensor([[True, True]]))
        tensor([-2.7726])
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return (lp * counted.to(lp.dtype)).sum(-1)


class SeededSampler:
    """A logits processor that turns greedy decoding into sampling at ``temperature``, seeded by ``seed``.

    It returns p / E with p = softmax(scores / T) and E ~ Exp(1) per token, so the greedy argmax is a
    sample of p (the exponential race; argmax(p / E) = argmax(log p + Gumbel noise)). This is the
    computation ``torch.multinomial(p, 1)`` performs on the global generator, here on its own one:
    with the same seed the draws are token-for-token those of ``torch.manual_seed(seed)`` followed by
    ``model.generate(do_sample=True, temperature=T, top_k=0, top_p=1.0)``.
    """

    def __init__(self, temperature: float, seed: int | None = None) -> None:
        self.temperature, self.seed = temperature, seed
        self.generator: torch.Generator | None = None  # made on the logits' device at the first call

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device)
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        probs = torch.softmax(scores, dim=-1)
        race = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return probs / race


class RowSeededSampler:
    """:class:`SeededSampler` with one generator per batch row: row i draws what ``SeededSampler(T, seeds[i])``
    draws on that row alone, whatever else is in the batch (batch-invariant sampled evaluations).

    Example:
        >>> generate_batch(lm, texts, True, 16, [RowSeededSampler(1.0, [0, 1, 2])])
    """

    def __init__(self, temperature: float, seeds: Sequence[int]) -> None:
        self.temperature, self.seeds = temperature, list(seeds)
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if len(self.seeds) != scores.shape[0]:
            raise SteerscopeError(f"RowSeededSampler has {len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        probs = torch.softmax(scores, dim=-1)  # [batch vocab]
        race = torch.stack([torch.empty_like(probs[i]).exponential_(1, generator=g)
                            for i, g in enumerate(self.generators)])
        return probs / race


def generate(
    lm: LM,
    prompts: str | Sequence[str],
    vector: VectorLike | Sequence[VectorLike | None] | None = None,
    alpha: float | Sequence[float] = 1.0,
    max_new_tokens: int = 64,
    positions: Positions = "all",
    batch_size: int | None = None,
    system: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    top_p: float = 1.0,
    top_k: int = 0,
    show_progress: bool = False,
    backend: str = "hf",
    layer: int | None = None,
    compiled: bool = False,
    engine_args: dict[str, Any] | None = None,
    condition: Gate | None = None,
) -> list[str]:
    """Generate completions for ``prompts`` (chat template applied), steered if ``vector`` is given.

    Greedy by default; with ``do_sample``, sampling at ``temperature`` from a ``torch.Generator``
    seeded with ``seed`` (None: a random seed), leaving the global RNG untouched; ``top_k`` (> 0: keep
    the k likeliest tokens; 0 = off) and ``top_p`` (< 1: nucleus sampling; 1.0 = off) filter first,
    in HF's order (temperature, top-k, top-p). They are ignored when greedy.
    Left padding; the returned strings are the new text only, one per prompt (a bare string is one
    prompt: ``generate(lm, "Hi")`` returns a list of one string). ``vector`` and ``alpha`` may each be one
    per prompt; a vector is a :class:`SteeringVector`, a raw tensor [d_model] at ``layer=``, or a saved
    vector's path or shipped name (:func:`steerscope.steer.as_vector`). The prompts become
    :class:`~steerscope.backends.base.Request` s for the ``backend``'s engine (:func:`steerscope.backends.base.engine`). ``backend="vllm"`` runs them on a cached vLLM
    engine (docs/vllm.md): greedy output is token for token the HF one; positions ``all`` / ``prompt``
    / ``generated`` only; sampling uses vLLM's sampler. With vLLM, ``compiled=True`` serves the compiled model
    (graph-safe steering) and ``engine_args`` go to vLLM's engine (e.g. ``{"tensor_parallel_size": 2}``: the
    ranks are bound to this process's CPUs, docs/vllm.md).
    ``batch_size``: rows per HF ``generate`` call; None (default) packs rows into calls of at most 8192
    tokens (rows x (longest prompt + new tokens)), one call when they fit (:mod:`steerscope.backends.hf`).
    ``condition``: each row is steered only where its own gate is open (HF and the eager vLLM engine; the compiled
    one runs them in its graph, up to three rules and four conditions: docs/conditional.md).

    Example:
        >>> generate(lm, ["How do I bake bread?"], vector=vec, alpha=4.0, max_new_tokens=32)
    """
    prompts = as_texts(prompts)
    from steerscope.backends.base import engine, requests

    vecs = None if vector is None else as_vectors(vector, lm, layer)
    eng = engine(backend, batch_size=batch_size, show_progress=show_progress, compiled=compiled, engine_args=engine_args)
    reqs = requests(prompts, vecs, alpha, positions, condition=condition, system=system,
                    template="apply" if chat else "none", max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, seed=seed, top_p=top_p, top_k=top_k)
    return eng.generate(lm, reqs)


def generate_batch(lm: LM, texts: Sequence[str], templated: bool, max_new_tokens: int,
                   processors: Sequence[Any] = (), context: ContextManager[Any] | None = None) -> list[str]:
    """One left-padded HF ``generate`` call on ``texts`` inside ``context``: greedy over ``processors``.

    Args:
        texts: the texts, chat template applied already when ``templated``.
        templated: tokenize without the tokenizer's extra special tokens (see :meth:`LM.tokenize`).
        max_new_tokens: tokens to generate at most.
        processors: logits processors after the NaN guard (e.g. a :class:`SeededSampler`: sampling).
        context: entered around the call, after the context-length check (None: nothing).

    Returns:
        The new text of each row.

    Example:
        >>> generate_batch(lm, [lm.format_chat("Hi")], True, 16, [SeededSampler(1.0, seed=0)])
    """
    from transformers import LogitsProcessorList

    batch = lm.tokenize(list(texts), padding_side="left", templated=templated)
    check_context(lm, batch["input_ids"].shape[1], max_new_tokens)
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=lm.tokenizer.pad_token_id)
    gen_kwargs["logits_processor"] = LogitsProcessorList([_nan_guard(), *processors])
    with context if context is not None else nullcontext(), torch.no_grad():
        ids = lm.model.generate(**batch, **gen_kwargs)
    new = ids[:, batch["input_ids"].shape[1]:]
    out: list[str] = lm.tokenizer.batch_decode(new, skip_special_tokens=True)
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


def _nan_guard() -> Any:
    """A logits processor that stops generation with one clear error on NaN/inf logits (cheap: one
    reduction per step), instead of silently returning empty or garbage text."""
    from transformers import LogitsProcessor

    class NaNGuard(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if torch.isnan(scores).any() or torch.isposinf(scores).any():
                raise SteerscopeError("the model produced NaN/inf logits (overflow): lower alpha, use float32, "
                                      "or check the vector")
            return scores

    return NaNGuard()
