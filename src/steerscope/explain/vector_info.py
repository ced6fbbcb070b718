"""Card section ``vector``: provenance, layers, norm per layer, and the norm relative to the mean
residual-stream norm at that layer (on the card's prompts, padding and each text's first token,
an attention sink with an outsized norm, excluded)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch

from steerscope.explain.records import VectorRecord
from steerscope.models.load import LM
from steerscope.sites import Site
from steerscope.steer import recording
from steerscope.vector import SteeringVector


@torch.no_grad()
def mean_resid_norms(lm: LM, prompts: Sequence[str], layers: Sequence[int], site: str = "resid_pre",
                     batch_size: int = 16) -> dict[int, float]:
    """Mean L2 norm of the residual stream at ``site`` of each layer over the prompts' tokens."""
    sums = {layer: 0.0 for layer in layers}
    count = 0
    for i in range(0, len(prompts), batch_size):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i:i + batch_size]], padding_side="left")
        keep = enc["attention_mask"].bool().clone()
        keep[torch.arange(len(keep)), keep.float().argmax(1)] = False  # each text's first token
        with recording(lm, [Site(layer, site) for layer in layers]) as cache:
            lm.model(**enc, use_cache=False)
        for layer in layers:
            sums[layer] += float(cache[Site(layer, site)][keep].float().norm(dim=-1).sum())
        count += int(keep.sum())
    return {layer: sums[layer] / max(count, 1) for layer in layers}


def section(lm: LM, vector: SteeringVector, prompts: Sequence[str], layer: int | None = None) -> VectorRecord:
    """The ``vector`` record; ``analysed_layer`` is ``layer`` or the layer with the largest relative norm.

    Example:
        >>> section(lm, vec, prompts).relative_norm  # {"12": 0.21}
    """
    norms = vector.norms()
    resid = mean_resid_norms(lm, prompts, vector.layers, "resid_pre" if vector.site == "resid_pre" else vector.site)
    rel = {k: norms[k] / resid[k] if resid[k] > 0 else float("nan") for k in vector.layers}
    chosen = layer if layer is not None else max(vector.layers, key=lambda k: rel[k])
    return VectorRecord(site=vector.site, layers=vector.layers, d_model=vector.d_model,
                        norm={str(k): norms[k] for k in vector.layers},
                        mean_resid_norm={str(k): resid[k] for k in vector.layers},
                        relative_norm={str(k): rel[k] for k in vector.layers},
                        analysed_layer=chosen, provenance=asdict(vector.provenance))
