"""The :class:`LM` view: the untouched Hugging Face model and tokenizer plus architecture facts.

Algorithms read weights through the accessors here (per-head ``W_Q/W_K/W_V/W_O`` and biases,
norm modules and their effective scales, the unembedding), never through the family's module
path strings. Shapes use one vocabulary: ``head d_model d_head vocab``.

Example:
    >>> lm = steerscope.load_model("smollm2-135m")
    >>> lm.W_Q(3).shape  # [head d_model d_head]
    torch.Size([9, 576, 64])
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from steerscope.models.families import Family
from steerscope.models.layout import QKVLayout, Which

NormKind = Literal["input", "pre_mlp", "post_attn", "post_mlp"]
_TOKENIZER_LOCK = threading.Lock()  # fast tokenizers are not safe to re-configure from several threads


def param(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | None:
    """A module's parameter ``name`` detached (None if it has none), typed for callers."""
    p = getattr(module, name, None)
    return p.detach() if isinstance(p, torch.Tensor) else None


def _weight(module: torch.nn.Module) -> torch.Tensor:
    w = param(module)
    if w is None:
        raise TypeError(f"{type(module).__name__} has no weight")
    return w


@dataclass
class LM:
    """A loaded causal LM: the untouched HF ``model`` and ``tokenizer`` plus an architecture view.

    Example:
        >>> lm = load_model("smollm2-135m")
        >>> lm.n_layers, lm.d_model
        (30, 576)
    """

    model: Any
    tokenizer: Any
    name: str
    family: Family
    _fingerprint: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        """One line of facts (the HF model's own repr is ``lm.model``)."""
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"LM(name={self.name!r}, family={self.model.config.model_type!r}, n_layers={self.n_layers}, "
                f"d_model={self.d_model}, dtype={dtype}, device={self.device})")

    # -- shape facts -------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_head(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    @property
    def device(self) -> torch.device:
        p: torch.Tensor = next(self.model.parameters())
        return p.device

    @property
    def dtype(self) -> torch.dtype:
        p: torch.Tensor = next(self.model.parameters())
        return p.dtype

    @property
    def layout(self) -> QKVLayout:
        """The q/k/v head layout (separate / fused, GQA groups); see :mod:`steerscope.models.layout`."""
        fused = self.family.qkv != "separate"
        return QKVLayout(self.family.qkv, self.n_heads, self.n_heads if fused else self.n_kv_heads,
                         self.d_head, self.d_model, o_conv1d=self.family.conv1d)

    # -- module access -----------------------------------------------------------------------
    @property
    def blocks(self) -> list[torch.nn.Module]:
        return list(self.model.get_submodule(self.family.blocks))

    @property
    def decoder(self) -> torch.nn.Module:
        """The module that holds the blocks (e.g. ``LlamaModel``; it owns the rotary embedding)."""
        mod: torch.nn.Module = self.model.get_submodule(self.family.blocks.rsplit(".", 1)[0])
        return mod

    def module(self, layer: int | None, path: str) -> torch.nn.Module:
        """The module at ``path`` inside block ``layer`` (or at top level when layer is None)."""
        root = self.model if layer is None else self.blocks[layer]
        mod: torch.nn.Module = root.get_submodule(path)
        return mod

    @property
    def embedding(self) -> torch.nn.Module:
        """The token embedding module (weight [vocab d_model])."""
        return self.module(None, self.family.embed)

    @property
    def unembedding(self) -> torch.nn.Module:
        """The LM head (weight [vocab d_model])."""
        return self.module(None, self.family.unembed)

    @property
    def final_norm(self) -> torch.nn.Module:
        """The norm applied before the LM head."""
        return self.module(None, self.family.final_norm)

    def _norm_path(self, kind: NormKind) -> str | None:
        fam = self.family
        return {"input": fam.input_norm, "pre_mlp": fam.pre_mlp_norm, "post_attn": fam.post_attn_norm,
                "post_mlp": fam.post_mlp_norm}[kind]

    def norm(self, layer: int, kind: NormKind) -> torch.nn.Module | None:
        """A block's norm: ``input`` (before attention), ``pre_mlp``, ``post_attn`` or ``post_mlp``
        (the last two exist in Gemma 2/3 only; None elsewhere)."""
        path = self._norm_path(kind)
        return None if path is None else self.module(layer, path)

    def gamma(self, layer: int, kind: NormKind) -> torch.Tensor:
        """Effective per-dimension scale γ of a block's norm (Gemma's ``1 + w`` included) [d_model]."""
        path = self._norm_path(kind)
        if path is None:
            raise KeyError(f"{self.model.config.model_type} has no {kind} norm")
        return self.norm_weight(layer, path)

    def norm_weight(self, layer: int | None, path: str) -> torch.Tensor:
        """Effective per-dimension scale γ of a norm (Gemma's ``1 + w`` included). [d_model]"""
        return _weight(self.module(layer, path)).float() + self.family.norm_offset

    @property
    def final_gamma(self) -> torch.Tensor:
        """Effective per-dimension scale γ of the final norm (Gemma's ``1 + w`` included) [d_model]."""
        return self.norm_weight(None, self.family.final_norm)

    @property
    def cache_kw(self) -> str:
        """The causal-LM forward's keyword for a KV cache: ``cache`` from transformers 5.24 on (which warns on
        ``past_key_values`` and will drop it), ``past_key_values`` before.

        Example:
            >>> out = lm.model(input_ids=ids[:, :-1], use_cache=True)
            >>> lm.model(input_ids=ids[:, -1:], **{lm.cache_kw: lm.cache_of(out)})
        """
        return "cache" if "cache" in self.forward_params else "past_key_values"

    @property
    def forward_params(self) -> frozenset[str]:
        """The names of the causal-LM forward's parameters (read once per forward function, not per call)."""
        forward = self.model.forward
        return _forward_params(getattr(forward, "__func__", forward))

    @staticmethod
    def cache_of(out: Any) -> Any:
        """The KV cache a forward with ``use_cache=True`` returned, under either name."""
        return out["cache"] if "cache" in out else out.past_key_values

    @property
    def parallel_residual(self) -> bool:
        """Whether attention and MLP both read the block input (GPT-NeoX) rather than in sequence."""
        return bool(self.family.parallel_residual)

    def attention(self, layer: int) -> torch.nn.Module:
        """Block ``layer``'s attention module."""
        return self.module(layer, self.family.attn)

    def mlp(self, layer: int) -> torch.nn.Module:
        """Block ``layer``'s MLP module."""
        return self.module(layer, self.family.mlp)

    def proj(self, layer: int, which: Literal["q", "k", "v", "o", "down"]) -> torch.nn.Module:
        """A projection module: attention ``q``/``k``/``v`` (fused layouts: one module), the attention
        output ``o``, or the MLP's output ``down``. GPT-2 stores o/down weights [in out] (Conv1D)."""
        fam = self.family
        paths = {"q": fam.q_proj, "k": fam.k_proj, "v": fam.v_proj, "o": fam.o_proj, "down": fam.down_proj}
        return self.module(layer, paths[which])

    @property
    def has_post_norms(self) -> bool:
        """Whether attention and/or MLP outputs pass a norm before the residual add (Gemma 2/3)."""
        return bool(self.family.post_attn_norm or self.family.post_mlp_norm)

    # -- weights -----------------------------------------------------------------------------
    def W_U(self) -> torch.Tensor:
        """Unembedding matrix [vocab d_model]."""
        return _weight(self.unembedding)

    def _w(self, layer: int, which: Which, repeat: bool) -> torch.Tensor:
        lay = self.layout
        w = lay.weight(_weight(self.proj(layer, which)), which)
        return lay.repeat_kv(w) if repeat and which != "q" else w

    def _b(self, layer: int, which: Which, repeat: bool) -> torch.Tensor | None:
        b = param(self.proj(layer, which), "bias")
        if b is None:
            return None
        lay = self.layout
        out = lay.bias(b, which)
        return lay.repeat_kv(out) if repeat and which != "q" else out

    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights per head [head d_model d_head] (applied to the normed block input,
        before rotary embeddings and any q-norm)."""
        return self._w(layer, "q", False)

    def W_K(self, layer: int, repeat: bool = True) -> torch.Tensor:
        """Key weights [head d_model d_head]: per query head (GQA kv heads repeated), or per kv head
        [kv_head d_model d_head] with ``repeat=False``."""
        return self._w(layer, "k", repeat)

    def W_V(self, layer: int, repeat: bool = True) -> torch.Tensor:
        """Value weights [head d_model d_head] (kv heads repeated for GQA; ``repeat=False``: per kv head)."""
        return self._w(layer, "v", repeat)

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights per head [head d_head d_model]."""
        return self.layout.o_weight(_weight(self.proj(layer, "o")))

    def b_Q(self, layer: int) -> torch.Tensor | None:
        """Query bias per head [head d_head], or None."""
        return self._b(layer, "q", False)

    def b_K(self, layer: int, repeat: bool = True) -> torch.Tensor | None:
        """Key bias [head d_head] (per kv head with ``repeat=False``), or None."""
        return self._b(layer, "k", repeat)

    def b_V(self, layer: int, repeat: bool = True) -> torch.Tensor | None:
        """Value bias [head d_head] (per kv head with ``repeat=False``), or None."""
        return self._b(layer, "v", repeat)

    def b_O(self, layer: int) -> torch.Tensor | None:
        """Output-projection bias [d_model] (shared by the heads), or None."""
        return param(self.proj(layer, "o"), "bias")

    # -- text --------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_chat(self, prompt: str, system: str | None = None, completion: str | None = None,
                    history: Sequence[tuple[str, str]] = ()) -> str:
        """The prompt as the model sees it: chat template with a generation prompt, then ``completion``.

        ``history``: earlier (user, assistant) turns placed before ``prompt``, e.g. worked examples for few-shot
        prompting. Without a chat template the turns are plain text, each followed by a blank line.

        Example:
            >>> lm.format_chat("What is 2 + 3?", history=[("What is 1 + 1?", "1 + 1 = 2. \\boxed{2}")])
        """
        if self.has_chat_template:
            msgs = [{"role": "system", "content": system}] if system else []
            for user, assistant in history:
                msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            msgs.append({"role": "user", "content": prompt})
            text = str(self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            turns = "".join(f"{user}\n{assistant}\n\n" for user, assistant in history)
            text = (system + "\n\n" if system else "") + turns + prompt
        return text + (completion or "")

    def tokenize(self, texts: list[str], padding_side: str = "left", templated: bool = True) -> Any:
        """Tokenize a batch with padding on ``padding_side``; templated text gets no extra BOS."""
        tok = self.tokenizer
        with _TOKENIZER_LOCK:  # padding side and padding are tokenizer state: one caller at a time
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            old = tok.padding_side
            tok.padding_side = padding_side
            try:
                add_special = not (templated and self.has_chat_template)
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
            finally:
                tok.padding_side = old
        return enc.to(self.device)

    # -- identity ----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A short hash of the config and a sample of the weights (cheap; independent of the dtype:
        the sample is rounded to bf16 first, so an fp32 and a bf16 load of one checkpoint agree)."""
        if self._fingerprint is None:
            self._fingerprint = self._weights_hash(torch.bfloat16)
        return self._fingerprint

    @property
    def legacy_fingerprint(self) -> str | None:
        """The fingerprint written by earlier versions (fp32 sample; None for other dtypes)."""
        return self._weights_hash(torch.float32) if self.dtype == torch.float32 else None

    def _weights_hash(self, sample_dtype: torch.dtype) -> str:
        h = hashlib.sha256()
        cfg = {k: v for k, v in self.config.to_dict().items() if not k.startswith("_") and k not in (
            "torch_dtype", "dtype", "transformers_version", "quantization_config", "architectures")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for p in (_weight(self.embedding), _weight(self.proj(self.n_layers - 1, "down"))):
                flat = p.to(sample_dtype).float().flatten()
                idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 4096))
                h.update(flat[idx].cpu().numpy().round(4).tobytes())
        return h.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _forward_params(forward: Callable[..., Any]) -> frozenset[str]:
    """:attr:`LM.forward_params` for one forward function (its signature read once, not once per generated token)."""
    return frozenset(inspect.signature(forward).parameters)
