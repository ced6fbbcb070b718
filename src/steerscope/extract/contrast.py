"""Extracting steering vectors from contrast sets.

Algorithm:
  1. Format each example: a prompt gets the chat template (with the generation prompt); a
     (prompt, completion) pair gets the template followed by the completion.
  2. Run the model in batches with left padding, recording the site at the requested layers; the
     forward pass is stopped right after the deepest layer needed.
  3. Gather the requested positions per example (negative from the end of the real text,
     non-negative from its first real token) and average them: one row per example.
  4. Hand positives and negatives to the method's pure function (``extract/aggregate.py``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from steerscope.errors import DataError, SiteError
from steerscope.extract.aggregate import METHODS, Aggregator
from steerscope.generation import as_texts, context_length
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.sites import RESIDUAL_POINTS, Site
from steerscope.steer import recording
from steerscope.vector import Provenance, SteeringVector, dataset_hash

Example = str | tuple[str, str] | dict[str, str]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early once every needed layer is recorded."""


def _format(lm: LM, ex: Example, system: str | None, chat: bool) -> str:
    if isinstance(ex, str):
        prompt, completion = ex, None
    elif isinstance(ex, dict):
        prompt, completion = ex["prompt"], ex.get("completion")
    else:
        prompt, completion = ex
    if chat:
        return lm.format_chat(prompt, system, completion)
    return prompt + (completion or "")


MAX_CHARS_PER_POSITION = 64  # no tokenizer packs more characters into one token: a longer text cannot fit
FALLBACK_CONTEXT = 1 << 17  # positions assumed when the config does not say


def check_lengths(lm: LM, texts: Sequence[str], templated: bool = True,
                  label: Callable[[int], str] = lambda i: f"text {i + 1}") -> None:
    """Raise :class:`DataError` naming the first text that cannot fit ``lm``'s context, before any batch is
    tokenised and padded: first by its length in characters (free), then in tokens (one text at a time).

    Example:
        >>> check_lengths(lm, [lm.format_chat(p) for p in prompts], label=lambda i: f"prompt {i + 1}")
    """
    n_ctx = context_length(lm) or FALLBACK_CONTEXT
    for i, t in enumerate(texts):
        if len(t) > n_ctx * MAX_CHARS_PER_POSITION:
            raise DataError(f"{label(i)} has {len(t)} characters, more than {lm.name}'s context of {n_ctx} positions "
                            "can hold; shorten or split it")
    add_special = not (templated and lm.has_chat_template)
    for i, t in enumerate(texts):
        n = len(lm.tokenizer(t, add_special_tokens=add_special)["input_ids"])
        if n > n_ctx:
            raise DataError(f"{label(i)} is {n} tokens long, more than {lm.name}'s context of {n_ctx} positions; "
                            "shorten or split it")


def collect(
    lm: LM,
    texts: str | Sequence[str],
    layers: Sequence[int],
    positions: Sequence[int] = (-1,),
    site: str = "resid_pre",
    batch_size: int = 16,
    templated: bool = True,
    show_progress: bool = False,
    check: bool = True,
) -> dict[int, torch.Tensor]:
    """Activations at ``site`` for each text (a bare string is one text), averaged over ``positions``:
    {layer: [n d_model]}. A text longer than the context is refused first (:func:`check_lengths`; ``check=False``
    when the caller has checked already).

    Example:
        >>> acts = collect(lm, [lm.format_chat("Hi")], layers=[6])
        >>> acts[6].shape
        torch.Size([1, 576])
    """
    texts = as_texts(texts)
    if site not in RESIDUAL_POINTS:
        raise SiteError(f"extraction reads residual-shaped sites ({', '.join(RESIDUAL_POINTS)}), not {site!r}")
    if not texts:
        raise DataError("no examples to collect activations from")
    for layer in layers:
        Site(layer, site).check(lm.n_layers)
    if check:
        check_lengths(lm, texts, templated)
    deepest = max(layers)
    stop_site = Site(deepest, "resid_pre" if site == "resid_pre" else "resid_post")

    def stop(_x: torch.Tensor, _c: Call) -> None:
        raise _Stop

    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    pos = torch.tensor(list(positions))
    for i in progress(range(0, len(texts), batch_size), desc="collect", enabled=show_progress):
        enc = lm.tokenize(list(texts[i : i + batch_size]), padding_side="left", templated=templated)
        mask = enc["attention_mask"].bool()
        real_len = mask.sum(1)
        start = mask.shape[1] - real_len  # left padding
        rel = torch.where(pos[None] < 0, real_len[:, None].cpu() + pos[None], pos[None].expand(len(real_len), -1))
        if (rel < 0).any() or (rel >= real_len[:, None].cpu()).any():
            raise DataError(f"positions {list(positions)} fall outside a text of {int(real_len.min())} tokens")
        cols = (start[:, None].cpu() + rel).to(lm.device)  # [batch k]
        with recording(lm, [Site(l, site) for l in layers]) as cache, attached(lm, {stop_site: stop}):
            try:
                with torch.no_grad():
                    lm.model(**enc, use_cache=False)
            except _Stop:
                pass
        for l in layers:
            x = cache[Site(l, site)]  # [batch pos d_model]
            g = torch.gather(x, 1, cols[:, :, None].expand(-1, -1, x.shape[-1]))  # [batch k d]
            out[l].append(g.float().mean(1).cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def extract(
    lm: LM,
    positive: str | Sequence[Example],
    negative: str | Sequence[Example],
    method: str | Aggregator = "dim",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] = (-1,),
    site: str = "resid_pre",
    batch_size: int = 16,
    system: str | None = None,
    chat: bool = True,
    show_progress: bool = False,
) -> SteeringVector:
    """Extract a steering vector from contrast sets.

    Args:
        lm: the model.
        positive, negative: prompts, or (prompt, completion) pairs / ``{"prompt", "completion"}``; a bare
            string is one prompt.
        method: ``dim``, ``caa``, ``pca`` (= ``pca_diff``), ``pca_center``, ``probe`` or ``actadd``; or an
            aggregator ``fn(pos [n d_model], neg [m d_model]) -> direction [d_model]`` (one row per example,
            positions averaged), recorded in the provenance under its ``__name__``.
        layers: block indices (default: the middle layer).
        positions: token positions averaged per example; negative from the end of the text
            (post-instruction positions for prompts, the answer token for pairs).
        site: residual-shaped site (default ``resid_pre``: ``output_hidden_states[layer]``).
        batch_size: examples per forward pass.
        system: optional system prompt for the chat template.
        chat: apply the chat template (False: raw text).

    Returns:
        A :class:`SteeringVector` with provenance.

    Example:
        >>> vec = extract(lm, harmful, harmless, method="dim", layers=[12], positions=[-1])
        >>> vec[12].shape
        torch.Size([576])
    """
    fn, name = _aggregator(method)
    positive, negative = _contrast_sets(positive, negative, method)
    layers = list(layers) if layers is not None else [lm.n_layers // 2]
    pos_t = [_format(lm, e, system, chat) for e in positive]
    neg_t = [_format(lm, e, system, chat) for e in negative]
    n_pos = len(pos_t)
    check_lengths(lm, pos_t + neg_t, chat, lambda i: f"positive example {i + 1}" if i < n_pos else
                  f"negative example {i - n_pos + 1}")
    acts = collect(lm, pos_t + neg_t, layers, positions, site, batch_size, templated=chat, show_progress=show_progress,
                   check=False)
    n = len(pos_t)
    dirs = {l: _direction(fn, a[:n], a[n:], lm.d_model) for l, a in acts.items()}
    _warn_degenerate(pos_t, neg_t, dirs)
    prov = Provenance.for_model(
        lm, method=name, positions=list(positions), dataset_hash=dataset_hash(list(positive) + ["|"] + list(negative)),
        n_examples=len(pos_t) + len(neg_t), args={"site": site, "system": system, "chat": chat},
    )
    return SteeringVector(dirs, site, prov)


def _aggregator(method: str | Aggregator) -> tuple[Aggregator, str]:
    """The aggregator for ``method`` (a name in :data:`METHODS`, or a function) and its name for the provenance."""
    if callable(method):
        return method, getattr(method, "__name__", type(method).__name__)
    if method in METHODS:
        return METHODS[method], method
    raise DataError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}, or pass a function "
                    "(pos, neg) -> direction")


def _contrast_sets(positive: str | Sequence[Example], negative: str | Sequence[Example], method: str | Aggregator
                   ) -> tuple[list[Example], list[Example]]:
    """Both sets as lists (a bare string is one prompt), checked non-empty, and pairs for ``caa``."""
    positive = [positive] if isinstance(positive, str) else list(positive)
    negative = [negative] if isinstance(negative, str) else list(negative)
    if not positive or not negative:
        raise DataError("extraction needs at least one positive and one negative example")
    if method == "caa" and not all(not isinstance(e, str) for e in list(positive) + list(negative)):
        raise DataError("method 'caa' takes (prompt, completion) pairs: the answer token is read at the completion")
    return positive, negative


def _direction(fn: Aggregator, pos: torch.Tensor, neg: torch.Tensor, d_model: int) -> torch.Tensor:
    out = fn(pos, neg)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (d_model,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the aggregator must return one direction of shape ({d_model},), got {got}")
    return out.detach().float()


def _warn_degenerate(pos: list[str], neg: list[str], dirs: dict[int, torch.Tensor]) -> None:
    """Warn when the contrast sets are identical or a layer's direction is (numerically) zero."""
    zero = [l for l, d in dirs.items() if float(d.norm()) <= 1e-6 * max(1.0, float(d.abs().max()))]
    if sorted(pos) == sorted(neg) or zero:
        what = "the positive and negative sets are identical" if sorted(pos) == sorted(neg) else "the sets barely differ"
        warnings.warn(f"{what}: the direction is a zero vector at layers {zero or sorted(dirs)}; steering with it "
                      "does nothing (give contrasting examples)", stacklevel=3)
