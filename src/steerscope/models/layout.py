"""The q/k/v layout of an attention block: the one place that knows where heads sit.

Three layouts (``Family.qkv``); ``H`` query heads, ``Hk`` key/value heads (GQA: ``Hk`` divides
``H``, query head ``h`` reads kv head ``h // (H // Hk)``), ``dh`` = d_head, ``d`` = d_model:

=============  ==========================================  ===================================
layout         projection weight                           projection output features
=============  ==========================================  ===================================
``separate``   q_proj [H*dh d], k_proj/v_proj [Hk*dh d]    [head d_head] per projection
``fused_gpt2`` c_attn Conv1D [d 3*H*dh] (in x out)         [q | k | v], each [head d_head]
``fused_neox`` query_key_value Linear [3*H*dh d]           per head [q k v]: [head 3 d_head]
=============  ==========================================  ===================================

The output projection is ``o_proj`` Linear [d H*dh] or, for GPT-2, Conv1D [H*dh d]. Hooks use
:meth:`QKVLayout.split` / :meth:`QKVLayout.merge` to expose sites ``attn.q|k|v`` per head;
:class:`~steerscope.models.lm.LM` uses :meth:`QKVLayout.weight` and :meth:`QKVLayout.bias` for
its per-head ``W_Q/W_K/W_V/W_O`` accessors.

Example:
    >>> lay = QKVLayout("separate", n_heads=4, n_kv_heads=2, d_head=16, d_model=64)
    >>> lay.split(torch.zeros(2, 5, 32), "k").shape
    torch.Size([2, 5, 2, 16])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from steerscope.errors import UnsupportedModelError

Which = Literal["q", "k", "v"]
KINDS = ("separate", "fused_gpt2", "fused_neox")


@dataclass(frozen=True)
class QKVLayout:
    """Head geometry of one architecture's attention projections.

    Attributes:
        kind: ``"separate"``, ``"fused_gpt2"`` or ``"fused_neox"``.
        n_heads: query heads H.
        n_kv_heads: key/value heads Hk (H for fused layouts).
        d_head: width of one head.
        d_model: residual width.
        o_conv1d: the output projection stores its weight [in out] (GPT-2's Conv1D).
    """

    kind: str
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    o_conv1d: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnsupportedModelError(f"unknown q/k/v layout {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(f"{self.n_heads} query heads do not split into {self.n_kv_heads} kv groups")

    @property
    def group(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The kv head that query head ``head`` reads."""
        return head // self.group

    def heads(self, which: Which) -> int:
        """Number of heads of projection ``which`` (kv heads for k and v)."""
        return self.n_heads if which == "q" else self.n_kv_heads

    def _index(self, which: Which) -> int:
        return "qkv".index(which)

    def split(self, out: torch.Tensor, which: Which) -> torch.Tensor:
        """The ``which`` part of a projection output [batch pos features] as [batch pos head d_head]."""
        b, p, _ = out.shape
        dh, i = self.d_head, self._index(which)
        if self.kind == "separate":
            return out.view(b, p, -1, dh)
        if self.kind == "fused_gpt2":
            w = self.n_heads * dh
            return out[..., i * w : (i + 1) * w].reshape(b, p, self.n_heads, dh)
        return out.reshape(b, p, self.n_heads, 3, dh)[..., i, :]

    def merge(self, out: torch.Tensor, which: Which, part: torch.Tensor) -> torch.Tensor:
        """A copy of projection output ``out`` with its ``which`` part replaced by ``part``
        [batch pos head d_head]; returns [batch pos features]."""
        b, p, _ = out.shape
        i = self._index(which)
        if self.kind == "separate":
            return part.reshape(b, p, -1)
        if self.kind == "fused_gpt2":
            w = self.n_heads * self.d_head
            new = out.clone()
            new[..., i * w : (i + 1) * w] = part.reshape(b, p, w)
            return new
        view = out.reshape(b, p, self.n_heads, 3, self.d_head).clone()
        view[..., i, :] = part
        return view.reshape(b, p, -1)

    def weight(self, w: torch.Tensor, which: Which) -> torch.Tensor:
        """Per-head weights [head d_model d_head] of ``which`` from the projection's weight."""
        d, dh, i = self.d_model, self.d_head, self._index(which)
        if self.kind == "separate":  # Linear [h*dh d]
            return w.view(self.heads(which), dh, d).transpose(1, 2)
        if self.kind == "fused_gpt2":  # Conv1D [d 3*H*dh]
            width = self.n_heads * dh
            return w[:, i * width : (i + 1) * width].reshape(d, self.n_heads, dh).permute(1, 0, 2)
        return w.view(self.n_heads, 3, dh, d)[:, i].transpose(1, 2)  # Linear [(H 3 dh) d]

    def bias(self, b: torch.Tensor, which: Which) -> torch.Tensor:
        """Per-head bias [head d_head] of ``which`` from the projection's bias."""
        dh, i = self.d_head, self._index(which)
        if self.kind == "separate":
            return b.view(self.heads(which), dh)
        if self.kind == "fused_gpt2":
            width = self.n_heads * dh
            return b[i * width : (i + 1) * width].view(self.n_heads, dh)
        return b.view(self.n_heads, 3, dh)[:, i]

    def o_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Per-head output weights [head d_head d_model] from the output projection's weight."""
        if self.o_conv1d:  # [H*dh d]
            return w.view(self.n_heads, self.d_head, self.d_model)
        return w.view(self.d_model, self.n_heads, self.d_head).permute(1, 2, 0)

    def repeat_kv(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Repeat a per-kv-head tensor along ``dim`` so that it has one entry per query head."""
        return x if self.group == 1 else x.repeat_interleave(self.group, dim=dim)
