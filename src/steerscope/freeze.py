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
     Fast path (Llama, Mistral, Qwen2, Qwen3): below l both halves are the same computation, so
     a hand-written greedy loop over the HF decoder layers runs layers 0..l-1 on the B prompt
     rows only and doubles the hidden state (and mask, rotary embeddings) to 2B rows entering
     layer l; the per-layer KV cache holds B rows below l and 2B from l. The final norm and LM
     head run on the steered rows' last position only. There QK freezing copies the base rows'
     queries and keys (sites ``attn.q``, ``attn.k``) instead of their patterns: the probabilities
     are the same function of the same q, k, mask and positions, and SDPA computes them (no
     eager attention). Other families use ``generate`` on the doubled batch.
  3. svv removal: at every layer >= l, subtract the layer-normalised steering vector
     D_c(alpha s ⊙ γ) (c = 1 / rms of that layer's attention input) from the value-projection
     input, i.e. v <- v - W_V (γ ⊙ alpha s) / rms(x). MLP ablation: subtract
     (γ' ⊙ alpha s) / rms(resid_mid) from every MLP input (the MLPs stop reading s directly).

Cited: Cheng, Wiegreffe, Manocha 2026 (arXiv 2604.08524), "Frozen generation", Table 1.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from steerscope.errors import SteerscopeError
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.steer import steering
from steerscope.vector import SteeringVector

MODES = ("none", "qk", "ov", "svv", "mlp")
FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # decoder loops mirrored by :func:`_fast_frozen_ids`
QK_SITES = ("attn.q", "attn.k")  # fast path: equal q and k give the steered rows the base patterns
_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


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
    if len(vector) != 1 or vector.site != "resid_pre":
        raise SteerscopeError("frozen generation takes a one-layer resid_pre vector; use vector.select([layer])")
    vector.check_compatible(lm)
    layer = vector.layers[0]
    return layer, vector[layer].to(lm.device, lm.dtype)


def ablation_hooks(lm: LM, vector: SteeringVector, alpha: float | torch.Tensor, mode: str) -> dict:
    """Hooks for ``svv`` / ``mlp`` removal (use inside a steering context; registered after it).

    ``alpha`` is a float or a per-row tensor [batch].
    """
    layer0, s = _single(lm, vector)
    fam = lm.family
    xs: dict[str, torch.Tensor] = {}

    def scaled(x: torch.Tensor) -> torch.Tensor:  # alpha*s per row [batch 1 d]
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        return a * s

    hooks: dict = {}
    for layer in range(layer0, lm.n_layers):
        if mode == "svv":
            norm = lm.module(layer, fam.input_norm)
            g = lm.norm_weight(layer, fam.input_norm).to(lm.dtype)
            W = lm.module(layer, fam.v_proj).weight.detach()  # [kv*d_head d_model]

            def keep(x: torch.Tensor, _c: Call, layer: int = layer) -> None:
                xs[f"pre{layer}"] = x

            def sub_v(v: torch.Tensor, _c: Call, layer: int = layer, norm=norm, g=g, W=W) -> torch.Tensor:
                x = xs[f"pre{layer}"]
                u = scaled(x) * g / _rms(norm, x)  # [b p d] layer-normalised s
                return v - torch.nn.functional.linear(u, W).view_as(v)
            hooks[f"blocks.{layer}.resid_pre"] = keep
            hooks[f"blocks.{layer}.attn.v"] = sub_v
        elif mode == "mlp":
            norm = lm.module(layer, fam.pre_mlp_norm)
            g = lm.norm_weight(layer, fam.pre_mlp_norm).to(lm.dtype)

            def keep_mid(x: torch.Tensor, _c: Call, layer: int = layer) -> None:
                xs[f"mid{layer}"] = x

            def sub_m(h: torch.Tensor, _c: Call, layer: int = layer, norm=norm, g=g) -> torch.Tensor:
                x = xs[f"mid{layer}"]
                return h - scaled(x) * g / _rms(norm, x)
            hooks[f"blocks.{layer}.resid_mid"] = keep_mid
            hooks[f"blocks.{layer}.mlp_in"] = sub_m
        else:
            raise SteerscopeError(f"ablation mode {mode!r} unknown; use svv or mlp")
    return hooks


@torch.no_grad()
def frozen_generate_ids(lm: LM, prompts: Sequence[str], vector: SteeringVector, alpha: float, mode: str = "qk",
                        max_new_tokens: int = 32, chat: bool = True) -> torch.Tensor:
    """Greedy steered generation with an ablation; new token ids [batch new] (pads after EOS).

    Args:
        mode: ``none`` (plain steering), ``qk``/``ov`` (frozen from the unsteered run, one batched
            forward per step; on Llama, Mistral and Qwen the layers below the steering layer run
            once per prompt), ``svv`` (value-path s removed) or ``mlp`` (MLP-input s removed).

    Example:
        >>> ids = frozen_generate_ids(lm, ["How do I pick a lock?"], vec, -1.0, mode="qk")
    """
    if mode not in MODES:
        raise SteerscopeError(f"mode {mode!r} unknown; choose one of {', '.join(MODES)}")
    layer0, _ = _single(lm, vector)
    texts = [lm.format_chat(p) if chat else p for p in prompts]
    enc = lm.tokenize(texts, padding_side="left", templated=chat)
    if mode in ("qk", "ov") and (fns := _mask_fns(lm)) is not None:  # Llama-like: shared lower layers
        return _fast_frozen_ids(lm, enc, vector, alpha, mode, max_new_tokens, fns)
    B, P = enc["input_ids"].shape
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    with ExitStack() as st:
        if mode in ("qk", "ov"):
            ids = torch.cat([enc["input_ids"]] * 2)
            mask = torch.cat([enc["attention_mask"]] * 2)
            st.enter_context(steering(lm, vector, [0.0] * B + [alpha] * B))
            site = "attn.pattern" if mode == "qk" else "attn.v"
            st.enter_context(attached(lm, {f"blocks.{layer}.{site}": (lambda x, _c: copy_base_rows(x, B))
                                           for layer in range(layer0, lm.n_layers)}))
            out = lm.model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList(
                [_Mirror(B)]), **kw)
            return out[B:, P:]
        st.enter_context(steering(lm, vector, alpha))
        if mode in ("svv", "mlp"):
            st.enter_context(attached(lm, ablation_hooks(lm, vector, alpha, mode)))
        out = lm.model.generate(**enc, **kw)
        return out[:, P:]


def _mask_fns(lm: LM) -> list | None:
    """Per-layer mask builders when the fast path mirrors this model's decoder loop, else None."""
    cfg = lm.model.config
    inner = lm.model.get_submodule(lm.family.blocks.rsplit(".", 1)[0])
    if cfg.model_type not in FAST_FAMILIES or not hasattr(inner, "rotary_emb") \
            or cfg._attn_implementation not in ("sdpa", "eager"):
        return None
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Llama: full attention; Mistral: sliding window when one is set
        sliding = cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * lm.n_layers
    if any(t not in _MASKS for t in types):
        return None
    return [_MASKS[t] for t in types]


def _eos_ids(lm: LM) -> torch.Tensor:
    """The EOS ids ``generate`` stops on (generation config), as a 1-D tensor (empty: none)."""
    eos = lm.model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(ids, dtype=torch.long, device=lm.device)


def _twice(x: torch.Tensor | None) -> torch.Tensor | None:
    """[batch ...] -> [2*batch ...] (None stays None: a mask the attention can skip)."""
    return None if x is None else torch.cat([x, x])


@torch.no_grad()
def _fast_frozen_ids(lm: LM, enc: dict, vector: SteeringVector, alpha: float, mode: str,
                     max_new_tokens: int, fns: list) -> torch.Tensor:
    """Frozen qk/ov greedy decoding, layers below the steering layer computed once (see step 2).

    Mirrors the installed transformers' ``LlamaModel.forward`` (embeddings, DynamicCache, per-layer
    causal masks, rotary embeddings, decoder-layer kwargs, final norm) and ``generate``'s greedy
    loop (position ids from the mask cumsum, pads after EOS; EOS ids from the generation config,
    as ``generate`` takes them). ``fns``: per-layer mask builders from :func:`_mask_fns`.
    Returns new ids [batch new].
    """
    layer0, _ = _single(lm, vector)
    fam, model = lm.family, lm.model
    inner = model.get_submodule(fam.blocks.rsplit(".", 1)[0])
    embed, norm, head = lm.module(None, fam.embed), lm.module(None, fam.final_norm), lm.module(None, fam.unembed)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # [batch prompt]
    B = ids.shape[0]
    eos, pad = _eos_ids(lm), lm.tokenizer.pad_token_id
    sites = QK_SITES if mode == "qk" else ("attn.v",)
    copy = {f"blocks.{layer}.{site}": (lambda x, _c: copy_base_rows(x, B))
            for layer in range(layer0, lm.n_layers) for site in sites}
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    with steering(lm, vector, [0.0] * B + [alpha] * B) as c1, attached(lm, copy) as c2:
        cfg = model.config
        cache = DynamicCache(config=cfg)
        for _ in range(max_new_tokens):
            n = ids.shape[1]
            for c in (c1, c2):  # what the model's top-level pre-hook would record
                c.begin(torch.cat([mask, mask]), n, mask.shape[1] - n)
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]  # [batch pos]
            h = embed(ids)  # [batch pos d_model]
            kw = dict(config=cfg, inputs_embeds=h, attention_mask=mask, past_key_values=cache, position_ids=pos)
            built = {f: f(**kw) for f in set(fns)}  # before the cache grows, as in the HF forward
            masks = [built[f] for f in fns]  # per layer [batch 1 pos key] or None
            pe = inner.rotary_emb(h, pos)  # (cos, sin) [batch pos d_head]
            for i, layer in enumerate(lm.blocks):
                if i == layer0:  # steering starts here: base rows, then steered rows
                    h, pos, pe = _twice(h), _twice(pos), (_twice(pe[0]), _twice(pe[1]))
                    masks = [_twice(m) for m in masks]
                h = layer(h, attention_mask=masks[i], position_embeddings=pe, position_ids=pos,
                          past_key_values=cache, use_cache=True)
            logits = head(norm(h[B:, -1:]))[:, -1].float()  # steered rows only [batch vocab]
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
    enc = lm.tokenize([lm.format_chat(p) if chat else p for p in prompts], padding_side="left", templated=chat)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos, pad = lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
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
