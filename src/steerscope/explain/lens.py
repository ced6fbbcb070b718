"""Card section ``lens``: the tokens the added vector (sign(alpha) * s) writes toward, by the logit
lens W_U v, without and with the final norm (:func:`steerscope.analyses.lens.logit_lens`)."""

from __future__ import annotations

from typing import Any

from steerscope.analyses import lens as L
from steerscope.explain.context import Context
from steerscope.explain.records import LensRecord


def section(ctx: Context) -> LensRecord:
    """The ``lens`` record: ``top_positive`` / ``top_negative`` tokens, ``raw`` and ``final_norm``.

    Example:
        >>> section(ctx).top_positive["raw"][:3]
    """
    sign = -1.0 if ctx.alpha < 0 else 1.0
    v = (sign * ctx.s.float())[None]
    k = ctx.settings.lens_k
    out: dict[str, Any] = {"sign": sign, "k": k, "top_positive": {}, "top_negative": {}, "scores": {}}
    for key, fn in (("raw", False), ("final_norm", True)):
        top = L.logit_lens(ctx.lm, v, k, final_norm=fn)[0]
        bottom = L.logit_lens(ctx.lm, v, k, final_norm=fn, largest=False)[0]
        out["top_positive"][key], out["top_negative"][key] = top.tokens, bottom.tokens
        out["scores"][key] = {"top": top.scores, "bottom": bottom.scores, "top_ids": top.ids, "bottom_ids": bottom.ids}
    return LensRecord(**out)
