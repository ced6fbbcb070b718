"""Frozen-attention generation and steering-path ablations (paper A, §5, Table 1).

Algorithm (greedy, steering alpha*s added at resid_pre[l] at every position):
  1. QK frozen: at each decoding step and every layer, the steered pass uses the attention
     probabilities of the unsteered pass on the same tokens. OV frozen: it uses the unsteered
     values (site ``attn.v``) instead; the steered pass keeps its own attention probabilities.
  2. Both run in ONE batched forward per step: batch = [base rows; steered rows] with per-row
     alphas [0, ..., alpha, ...]; hooks copy the base rows' patterns (or values) into the
     steered rows; a logits processor gives the base rows the steered rows' scores, so both
     halves append the same (steered greedy) token and the base rows' KV cache always holds the
     unsteered pass on the steered text. Causality makes this equal to the two-pass reference
     (:func:`reference_frozen_generate`: per step, an unsteered pass, then a patched steered
     pass, no cache).
     Fast path (every supported family whose causal-LM forward takes a cache and
     ``logits_to_keep``: Llama, Mistral, Qwen2/3, Gemma, Gemma 2, Gemma 3, GPT-2, GPT-NeoX): below
     l both halves are the same computation, so a greedy loop calls the HF model itself on the B
     prompt rows and :func:`steerscope.hooks.widened_batch` doubles what enters block l (residual
     stream, mask, rotary embeddings, position ids) to 2B rows; the model's KV cache holds B rows
     below l and 2B from l; the final norm and LM head run on the steered rows (the LM head on the
     last position only). Nothing of the model is re-implemented, so post-sublayer norms, logit soft-capping, q/k norms and
     sliding-window layers (Gemma 2/3) are the model's own. There QK freezing copies the base
     rows' queries and keys (sites ``attn.q``, ``attn.k``, before rotary and q/k norms) instead
     of their patterns: the probabilities are the same function of the same q, k, mask and
     positions, and the model's attention kernel computes them (no eager attention). Otherwise
     (or with ``fast=False``) ``generate`` runs on the doubled batch.
  3. svv removal: at every layer >= l, subtract the layer-normalised steering vector
     D_c(alpha s ⊙ γ) (c = 1 / rms of that layer's attention input) from the value-projection
     input, i.e. v <- v - W_V (γ ⊙ alpha s) / rms(x). MLP ablation: subtract
     (γ' ⊙ alpha s) / rms(resid_mid) from every MLP input (the MLPs stop reading s directly).

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Frozen generation", Table 1.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Sequence

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from steerscope.errors import SteerscopeError
from steerscope.generation import chat_batch, position_ids
from steerscope.hooks import Call, HookFn, attached, widened_batch
from steerscope.models.lm import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector

MODES = ("none", "qk", "ov", "svv", "mlp")
QK_SITES = ("attn.q", "attn.k")  # fast path: equal q and k give the steered rows the base patterns


class _Mirror(LogitsProcessor):
    """Give rows [0, n) the scores of rows [n, 2n): both halves pick the steered greedy token."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[: self.n] = scores[self.n :]
        return scores


def copy_base_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """Rows [n, 2n) <- rows [0, n) along the batch axis (pure)."""
    out = x.clone()
    out[n:] = x[:n]
    return out


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return (x.float().pow(2).mean(-1, keepdim=True) + eps).sqrt().to(x.dtype)


def _single(lm: LM, vector: SteeringVector) -> tuple[int, torch.Tensor]:
    vector.check_compatible(lm)
    layer, s = vector.single_layer(purpose="frozen generation")
    return layer, s.to(lm.device, lm.dtype)


def ablation_hooks(lm: LM, vector: SteeringVector, alpha: float | torch.Tensor, mode: str) -> dict[str, HookFn]:
    """Hooks for ``svv`` / ``mlp`` removal (use inside a steering context; registered after it).

    ``alpha`` is a float or a per-row tensor [batch]. Needs RMSNorm blocks (not GPT-2 / NeoX).
    """
    layer0, s = _single(lm, vector)
    if mode not in ("svv", "mlp"):
        raise SteerscopeError(f"ablation mode {mode!r} unknown; use svv or mlp")
    if isinstance(lm.norm(layer0, "input"), torch.nn.LayerNorm):
        raise SteerscopeError(f"{mode} removal is defined for RMSNorm blocks; {lm.model.config.model_type} uses "
                              "LayerNorm (its mean subtraction is not modelled). Use mode qk, ov or none.")
    xs: dict[str, torch.Tensor] = {}

    def scaled(x: torch.Tensor) -> torch.Tensor:  # alpha*s per row [batch 1 d]
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        return a * s

    def keep(key: str) -> HookFn:
        return lambda x, _c: xs.__setitem__(key, x)

    hooks: dict[str, HookFn] = {}
    for layer in range(layer0, lm.n_layers):
        if mode == "svv":
            norm, g = lm.norm(layer, "input"), lm.gamma(layer, "input").to(lm.dtype)
            W = lm.W_V(layer, repeat=False)  # [kv_head d_model d_head]

            def sub_v(v: torch.Tensor, _c: Call, layer: int = layer, norm: Any = norm, g: torch.Tensor = g,
                      W: torch.Tensor = W) -> torch.Tensor:
                x = xs[f"pre{layer}"]
                u = scaled(x) * g / _rms(norm, x)  # [b p d] layer-normalised s
                return v - torch.einsum("bpm,hmd->bphd", u, W)
            hooks[f"blocks.{layer}.resid_pre"] = keep(f"pre{layer}")
            hooks[f"blocks.{layer}.attn.v"] = sub_v
        else:
            norm, g = lm.norm(layer, "pre_mlp"), lm.gamma(layer, "pre_mlp").to(lm.dtype)

            def sub_m(h: torch.Tensor, _c: Call, layer: int = layer, norm: Any = norm,
                      g: torch.Tensor = g) -> torch.Tensor:
                x = xs[f"mid{layer}"]
                return h - scaled(x) * g / _rms(norm, x)
            hooks[f"blocks.{layer}.resid_mid"] = keep(f"mid{layer}")
            hooks[f"blocks.{layer}.mlp_in"] = sub_m
    return hooks


@torch.no_grad()
def frozen_generate_ids(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, mode: str = "qk",
                        max_new_tokens: int = 32, chat: bool = True, fast: bool | None = None) -> torch.Tensor:
    """Greedy steered generation with an ablation; new token ids [batch new] (pads after EOS).

    Args:
        mode: ``none`` (plain steering), ``qk``/``ov`` (frozen from the unsteered run, one batched
            forward per step; the layers below the steering layer run once per prompt where the
            fast path applies), ``svv`` (value-path s removed) or ``mlp`` (MLP-input s removed).
        fast: qk/ov only: force (True) or avoid (False) the fast path; None: use it where it applies.

    Example:
        >>> ids = frozen_generate_ids(lm, ["How do I pick a lock?"], vec, -1.0, mode="qk")
    """
    if mode not in MODES:
        raise SteerscopeError(f"mode {mode!r} unknown; choose one of {', '.join(MODES)}")
    layer0, _ = _single(lm, vector)
    enc = chat_batch(lm, prompts, chat=chat)
    if mode in ("qk", "ov") and fast is not False:
        missing = _fast_missing(lm)
        if fast and missing:
            raise SteerscopeError(f"the fast frozen path needs {missing}; call with fast=None or False")
        if not missing:
            return _fast_frozen_ids(lm, enc, vector, alpha, mode, max_new_tokens)
    B, P = enc["input_ids"].shape
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    with ExitStack() as st:
        if mode in ("qk", "ov"):
            ids = torch.cat([enc["input_ids"]] * 2)
            mask = torch.cat([enc["attention_mask"]] * 2)
            st.enter_context(steering(lm, vector, [0.0] * B + [alpha] * B))
            site = "attn.pattern" if mode == "qk" else "attn.v"
            st.enter_context(attached(lm, {f"blocks.{layer}.{site}": _copy_hook(B) for layer in range(layer0, lm.n_layers)}))
            out = lm.model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList(
                [_Mirror(B)]), **kw)
            return out[B:, P:]  # type: ignore[no-any-return]
        st.enter_context(steering(lm, vector, alpha))
        if mode in ("svv", "mlp"):
            st.enter_context(attached(lm, ablation_hooks(lm, vector, alpha, mode)))
        out = lm.model.generate(**enc, **kw)
        return out[:, P:]  # type: ignore[no-any-return]


def _copy_hook(n: int) -> HookFn:
    return lambda x, _c: copy_base_rows(x, n)


def _fast_missing(lm: LM) -> str:
    """What the fast path needs and this model lacks ("" when it applies)."""
    params = lm.forward_params
    if "logits_to_keep" not in params:
        return f"a causal-LM forward with logits_to_keep ({type(lm.model).__name__} has none)"
    if not ({"cache", "past_key_values"} & params) or "position_ids" not in params:
        return f"a forward taking a KV cache and position ids ({type(lm.model).__name__})"
    return ""


def _eos_ids(lm: LM) -> torch.Tensor:
    """The EOS ids ``generate`` stops on (generation config), as a 1-D tensor (empty: none)."""
    eos = lm.model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(ids, dtype=torch.long, device=lm.device)


@torch.no_grad()
def _fast_frozen_ids(lm: LM, enc: Any, vector: SteeringVector, alpha: float, mode: str,
                     max_new_tokens: int) -> torch.Tensor:
    """Frozen qk/ov greedy decoding, layers below the steering layer computed once (see step 2).

    The model's own forward on the B prompt rows, widened to 2B rows from the steering layer on
    (the final norm and LM head on the steered rows' last position only);
    ``generate``'s greedy loop (position ids from the mask cumsum, pads after EOS; EOS ids from
    the generation config, as ``generate`` takes them). Returns new ids [batch new].
    """
    layer0, _ = _single(lm, vector)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # [batch prompt]
    B = ids.shape[0]
    eos, pad = _eos_ids(lm), lm.tokenizer.pad_token_id
    sites = QK_SITES if mode == "qk" else ("attn.v",)
    copy = {f"blocks.{layer}.{site}": _copy_hook(B) for layer in range(layer0, lm.n_layers) for site in sites}
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    cache = DynamicCache(config=lm.model.config)
    with widened_batch(lm, layer0, head_on_copy=True), steering(lm, vector, [0.0] * B + [alpha] * B), attached(lm, copy):
        for _ in range(max_new_tokens):
            pos = position_ids(mask)[:, -ids.shape[1]:]  # [batch pos]
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                           **{lm.cache_kw: cache})
            logits = out.logits[:, -1].float()  # the steered rows only (head_on_copy) [batch vocab]
            tok = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
            new.append(tok)
            done |= torch.isin(tok, eos)
            ids, mask = tok[:, None], torch.cat([mask, torch.ones_like(tok[:, None], dtype=mask.dtype)], 1)
            if done.all():
                break
    return torch.stack(new, 1) if new else ids.new_zeros(B, 0)


def frozen_generate(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, mode: str = "qk",
                    max_new_tokens: int = 32, batch_size: int = 16, chat: bool = True) -> list[str]:
    """Like :func:`frozen_generate_ids`, decoded, in batches of ``batch_size`` prompts."""
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = frozen_generate_ids(lm, prompts[i : i + batch_size], vector, alpha, mode, max_new_tokens, chat)
        out += lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


@torch.no_grad()
def reference_frozen_generate(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, mode: str,
                              max_new_tokens: int = 8, chat: bool = True) -> torch.Tensor:
    """The naive two-pass reference for ``qk``/``ov``: per step, an unsteered pass recording
    patterns/values at every layer, then the steered pass with them patched in (no KV cache).
    Returns new token ids [batch new]."""
    layer0, _ = _single(lm, vector)
    site = {"qk": "attn.pattern", "ov": "attn.v"}[mode]
    enc = chat_batch(lm, prompts, chat=chat)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos, pad = lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        pos = position_ids(mask)
        base: dict[int, torch.Tensor] = {}
        sites = {f"blocks.{layer}.{site}": (lambda x, _c, layer=layer: base.__setitem__(layer, x.clone()))
                 for layer in range(layer0, lm.n_layers)}
        with attached(lm, sites):
            lm.model(input_ids=ids, attention_mask=mask, position_ids=pos)
        patch = {f"blocks.{layer}.{site}": (lambda x, _c, layer=layer: base[layer]) for layer in range(layer0, lm.n_layers)}
        with steering(lm, vector, alpha), attached(lm, patch):
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        new.append(tok)
        done |= tok == eos
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tok[:, None])], 1)
        if done.all():
            break
    return torch.stack(new, 1)
