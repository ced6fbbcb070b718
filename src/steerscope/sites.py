"""The site vocabulary: every tensor steerscope reads or writes crosses a named site.

Shapes (one vocabulary: ``batch pos d_model head d_head vocab``):

=================  ===============================  ==============================================
point              shape                            meaning
=================  ===============================  ==============================================
``resid_pre``      [batch pos d_model]              residual entering block l (= hidden_states[l])
``resid_mid``      [batch pos d_model]              residual after attention, before the MLP
``resid_post``     [batch pos d_model]              residual leaving block l
``attn_out``       [batch pos d_model]              what attention adds to the residual
``mlp_in``         [batch pos d_model]              normed input of the MLP
``mlp_out``        [batch pos d_model]              what the MLP adds to the residual
``attn.q|k|v``     [batch pos head d_head]          projections before rotary (k, v: kv heads)
``attn.z``         [batch pos head d_head]          per-head mixed values, input of o_proj
``attn.pattern``   [batch head query key]           attention probabilities
``embed``          [batch pos d_model]              token embeddings (block 0's input)
``logits``         [batch pos vocab]                model output
=================  ===============================  ==============================================

Strings follow TransformerLens' style: ``"blocks.6.resid_pre"``, ``"blocks.3.attn.pattern"``,
``"embed"``, ``"logits"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from steerscope.errors import SiteError

BLOCK_POINTS = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_in",
    "mlp_out",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.z",
    "attn.pattern",
)
GLOBAL_POINTS = ("embed", "logits")
RESIDUAL_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out")

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A named place in the model: ``Site(6, "resid_pre")`` is ``blocks.6.resid_pre``."""

    layer: int | None
    point: str

    def __post_init__(self) -> None:
        if self.layer is None:
            if self.point not in GLOBAL_POINTS:
                raise SiteError(f"site point {self.point!r} needs a layer; use 'blocks.N.{self.point}'")
        elif self.point not in BLOCK_POINTS:
            raise SiteError(
                f"unknown site point {self.point!r}; choose one of {', '.join(BLOCK_POINTS + GLOBAL_POINTS)}"
            )

    def __str__(self) -> str:
        return self.point if self.layer is None else f"blocks.{self.layer}.{self.point}"

    @classmethod
    def parse(cls, name: str | Site) -> Site:
        """Parse ``"blocks.6.resid_pre"``, ``"embed"`` or ``"logits"`` into a :class:`Site`."""
        if isinstance(name, Site):
            return name
        if name in GLOBAL_POINTS:
            return cls(None, name)
        m = _SITE_RE.match(name)
        if not m:
            raise SiteError(
                f"cannot parse site {name!r}; write 'blocks.<layer>.<point>' (e.g. 'blocks.6.resid_pre'), 'embed' or 'logits'"
            )
        return cls(int(m.group(1)), m.group(2))

    def check(self, n_layers: int) -> Site:
        """Raise :class:`SiteError` unless the layer exists in a model with ``n_layers`` blocks."""
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise SiteError(f"layer {self.layer} is out of range: this model has layers 0..{n_layers - 1}")
        return self


# -- where each point lives (hooks.py installs from this table) ---------------------------------
@dataclass(frozen=True)
class SiteSpec:
    """One row of :data:`SITE_TABLE`.

    Attributes:
        module: family fields naming the module, first one the family has wins (``""``: the block
            itself; global sites resolve from the model root).
        hook: ``pre`` (the module's first input), ``post`` (its output, first element of a tuple)
            or ``pattern`` (attention probabilities, :mod:`steerscope.models.attention`).
        adapter: shape adapter from the raw tensor to the site's shape (``steerscope.hooks.ADAPTERS``).
        shape: the axes the hook function sees (and must return), from the one vocabulary.
        write: how a returned tensor reaches the model (documentation of the adapter's inverse).
    """

    module: tuple[str, ...]
    hook: str
    adapter: str = "plain"
    shape: str = "batch pos d_model"
    write: str = "replaces the tensor"


_MERGED = "merged back into the (possibly fused) projection output"
SITE_TABLE: dict[str, SiteSpec] = {
    "embed": SiteSpec(("embed",), "post"),
    "logits": SiteSpec(("unembed",), "post", shape="batch pos vocab"),
    "resid_pre": SiteSpec(("",), "pre"),
    "resid_post": SiteSpec(("",), "post"),
    "attn_out": SiteSpec(("post_attn_norm", "attn"), "post"),
    "resid_mid": SiteSpec(("post_attn_norm", "attn"), "post", "resid_mid",
                          write="folded into attn_out (new - resid_pre), so it reaches the stream as written"),
    "mlp_in": SiteSpec(("mlp",), "pre"),
    "mlp_out": SiteSpec(("post_mlp_norm", "mlp"), "post"),
    "attn.q": SiteSpec(("q_proj",), "post", "q", "batch pos head d_head", _MERGED),
    "attn.k": SiteSpec(("k_proj",), "post", "k", "batch pos kv_head d_head", _MERGED),
    "attn.v": SiteSpec(("v_proj",), "post", "v", "batch pos kv_head d_head", _MERGED),
    "attn.z": SiteSpec(("o_proj",), "pre", "heads", "batch pos head d_head", "heads flattened into o_proj's input"),
    "attn.pattern": SiteSpec(("attn",), "pattern", "plain", "batch head query key",
                             "mixes the values instead of the model's pattern"),
}
