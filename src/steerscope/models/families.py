"""Architecture adapters: one declarative table per ``model_type``.

Each :class:`Family` names where the pieces of a Hugging Face causal LM live, as dotted
module paths relative to the top-level model (blocks) or to one block. Nothing here
re-implements a model; the tables only let hooks find modules (the pyvene idea).
"""

from __future__ import annotations

from dataclasses import dataclass

from steerscope.errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """Where the parts of one architecture live.

    Paths inside a block are relative to the block module. ``qkv`` is ``"separate"`` (q_proj,
    k_proj, v_proj), ``"fused_gpt2"`` (Conv1D c_attn: [q | k | v]) or ``"fused_neox"``
    (Linear, per-head interleaved [h: q k v]).
    """

    blocks: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    o_proj: str
    down_proj: str
    input_norm: str
    pre_mlp_norm: str
    q_proj: str = ""
    k_proj: str = ""
    v_proj: str = ""
    qkv: str = "separate"
    post_attn_norm: str | None = None  # Gemma2/3: norm applied to the attention output
    post_mlp_norm: str | None = None  # Gemma2/3: norm applied to the MLP output
    norm_offset: float = 0.0  # Gemma RMSNorm multiplies by (offset + weight)
    parallel_residual: bool = False  # GPT-NeoX with use_parallel_residual
    conv1d: bool = False  # GPT-2 stores weights as [in, out]


_LLAMA = Family(
    blocks="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    input_norm="input_layernorm",
    pre_mlp_norm="post_attention_layernorm",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
)

_GEMMA2 = Family(
    **{
        **_LLAMA.__dict__,
        "pre_mlp_norm": "pre_feedforward_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
        "norm_offset": 1.0,
    }
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": Family(**{**_LLAMA.__dict__, "norm_offset": 1.0}),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gpt2": Family(
        blocks="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        mlp="mlp",
        o_proj="attn.c_proj",
        down_proj="mlp.c_proj",
        input_norm="ln_1",
        pre_mlp_norm="ln_2",
        q_proj="attn.c_attn",
        k_proj="attn.c_attn",
        v_proj="attn.c_attn",
        qkv="fused_gpt2",
        conv1d=True,
    ),
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",  # transformers 5 (4.x: embed_out)
        attn="attention",
        mlp="mlp",
        o_proj="attention.dense",
        down_proj="mlp.dense_4h_to_h",
        input_norm="input_layernorm",
        pre_mlp_norm="post_attention_layernorm",
        q_proj="attention.query_key_value",
        k_proj="attention.query_key_value",
        v_proj="attention.query_key_value",
        qkv="fused_neox",
        parallel_residual=True,
    ),
}


def family_for(model_type: str) -> Family:
    """Return the adapter table for a config's ``model_type``.

    Raises:
        UnsupportedModelError: with the list of supported types.
    """
    if model_type == "gemma3":  # multimodal wrapper config; the text model is what we steer
        model_type = "gemma3_text"
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no architecture table; supported: "
            f"{', '.join(sorted(FAMILIES))}. Add a Family to steerscope/models/families.py."
        ) from None
