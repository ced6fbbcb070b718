"""``explain``: the mechanism card of a steering vector, composed from one small module per section.

Sections, in order (each one record of the run; a killed run resumes at the first missing one):
``vector`` -> ``dose`` (fixes alpha when none is given) -> the reference ``behaviour`` batch ->
``lens`` -> ``attribution`` -> ``frozen`` -> ``circuit`` -> ``sparsity`` -> ``identifiability``,
then the rule-based ``verdict``. A section whose analysis raises a :class:`SteerscopeError` for
this model (e.g. EAP-IG on Gemma) is listed under ``unsupported`` with the reason; the rest runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from steerscope.errors import DataError, SteerscopeError, VectorError
from steerscope.explain import attribution, circuit, dose, frozen, identifiability, lens, sparsity, vector_info
from steerscope.explain.behaviour import Behaviour, build
from steerscope.explain.context import Context, MemoryRun, ScoreFn, Settings
from steerscope.explain.scorers import resolve_scorer
from steerscope.explain.verdict import verdict
from steerscope.generation import as_texts, context_length
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.runs import Run, write_json
from steerscope.vector import SteeringVector, check_finite

KEYS = ("vector", "dose", "lens", "attribution", "frozen", "circuit", "sparsity", "identifiability", "verdict",
        "unsupported")
ANALYSES: dict[str, Callable[[Context, Behaviour], dict[str, Any]]] = {
    "lens": lambda ctx, _b: lens.section(ctx), "attribution": attribution.section, "frozen": frozen.section,
    "circuit": circuit.section, "sparsity": sparsity.section, "identifiability": identifiability.section}
NEEDS = {"circuit": "attribution", "sparsity": "attribution"}


@dataclass
class Explanation:
    """The mechanism card: one dict per section (None when unsupported), the verdict, and why
    sections were skipped. ``to_dict()`` is the ``card.json`` object."""

    vector: dict[str, Any]
    dose: dict[str, Any] | None = None
    lens: dict[str, Any] | None = None
    attribution: dict[str, Any] | None = None
    frozen: dict[str, Any] | None = None
    circuit: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    identifiability: dict[str, Any] | None = None
    verdict: str = ""
    unsupported: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with exactly the card keys (non-finite numbers become None)."""
        return {k: _clean(getattr(self, k)) for k in KEYS}

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write ``out/card.json`` and ``out/card.html``."""
        from steerscope.explain.html import write_card

        out = Path(out)
        write_json(out / "card.json", self.to_dict())
        return out / "card.json", write_card(self.to_dict(), out / "card.html")


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _timed(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """``fn`` with its process CPU time added to the record (``_cpu_seconds``; the runner adds ``_seconds``)."""
    def run() -> dict[str, Any]:
        t0 = time.process_time()
        rec = dict(fn())
        rec["_cpu_seconds"] = round(time.process_time() - t0, 2)
        return rec
    return run


def _bind(fn: Callable[[Context, Behaviour], dict[str, Any]], ctx: Context, beh: Behaviour
          ) -> Callable[[], dict[str, Any]]:
    return lambda: fn(ctx, beh)


def _timings(run: Run | MemoryRun, names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Wall and CPU seconds of each finished section (as first computed, not when reused)."""
    out = {}
    for n in names:
        if run.done(n):
            rec = run.load(n)
            out[n] = {"wall_s": rec.get("_seconds"), "cpu_s": rec.get("_cpu_seconds")}
    return out


def _digest(vector: SteeringVector, prompts: Sequence[str]) -> tuple[str, str]:
    h = hashlib.sha256()
    for k in vector.layers:
        h.update(str(k).encode())
        h.update(vector[k].float().numpy().tobytes())
    return h.hexdigest()[:16], hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def check_inputs(vector: SteeringVector, alpha: float | None = None, layer: int | None = None) -> None:
    """Refuse, before any model work, what no card can be made of: a vector at another site than
    resid_pre, a ``layer`` it lacks, a zero direction, or an alpha that is zero, NaN/inf, or whose
    product with the vector's norm overflows float32 (:class:`VectorError`)."""
    if vector.site != "resid_pre":
        raise VectorError(f"explain analyses resid_pre vectors, not {vector.site}; a resid_post vector of layer l "
                          "is the resid_pre vector of layer l+1 (SteeringVector({l + 1: v}))")
    if layer is not None and layer not in vector.layers:
        raise VectorError(f"layer {layer} is not in the vector; it has layers {vector.layers}")
    norms = [n for k, n in vector.norms().items() if layer is None or k == layer]
    if max(norms) == 0:
        raise VectorError(f"the vector is zero at {'layer ' + str(layer) if layer is not None else 'every layer'}; "
                          "there is no steering to explain")
    if alpha is not None:
        check_finite(alpha, "alpha")
        if alpha == 0:
            raise VectorError("alpha 0 does not steer; give a non-zero alpha, or none to take it from the dose range")
        if abs(alpha) * max(norms) > torch.finfo(torch.float32).max:
            raise VectorError(f"alpha {alpha:g} times the vector's norm {max(norms):.3g} overflows float32; "
                              "use a smaller alpha")


def _check_context(lm: LM, prompts: Sequence[str], n_new: int) -> None:
    """:class:`DataError` when the longest prompt plus the card's ``n_new`` response tokens exceed the context."""
    n_ctx = context_length(lm)
    n = int(lm.tokenize([lm.format_chat(p) for p in prompts])["input_ids"].shape[1])
    if n_ctx is not None and n + n_new > n_ctx:
        raise DataError(f"a prompt of {n} tokens plus the card's {n_new} response tokens exceeds {lm.name}'s "
                        f"context of {n_ctx} positions; shorten the prompts")


def explain(lm: LM, vector: SteeringVector, prompts: str | Sequence[str] | None = None, alpha: float | None = None,
            scorer: str | ScoreFn | None = None, quick: bool = False, out: str | Path | None = None,
            layer: int | None = None, settings: Settings | None = None, force: bool = False,
            show_progress: bool = True) -> Explanation:
    """Explain why a steering vector works on a model: the mechanism card.

    Args:
        lm: the model. vector: any resid_pre :class:`SteeringVector` (hand-made, imported, shipped).
        prompts: prompts to steer, a bare string being one (default: the shipped neutral set, 16 or 8 with ``quick``).
        alpha: the scale; None picks the upper end of the dose section's recommended range.
        scorer: None, ``"refusal"``, a trait (``formality``, ``sentiment``, ``politeness``) or a
            callable ``texts -> scores``; adds scorer means to the generation-based sections.
        quick: small sizes (:meth:`Settings.quick`). out: a folder: resumable, writes card.json/.html.
        layer: the layer to analyse for a multi-layer vector (default: largest relative norm).

    Returns:
        :class:`Explanation`.

    Example:
        >>> card = explain(lm, ss.SteeringVector.load("formality.safetensors"), alpha=6.0, quick=True)
        >>> card.frozen["ov"]["effect_retained"]
    """
    check_inputs(vector, alpha, layer)
    vector.check_compatible(lm)
    st = settings or (Settings.quick() if quick else Settings())
    prompts = as_texts(prompts) if prompts else dose.neutral_prompts(8 if quick else 16)
    _check_context(lm, prompts, max(st.n_tokens, st.gen_tokens))
    fn, scorer_info = resolve_scorer(scorer)
    vsha, psha = _digest(vector, prompts)
    config = {"model": lm.name, "vector": vsha, "prompts": psha, "alpha": alpha, "layer": layer,
              "scorer": scorer_info["name"], "settings": st.to_dict()}
    run: Run | MemoryRun = Run(out, config=config, force=force) if out is not None else MemoryRun()
    rec = run.step("vector", _timed(lambda: vector_info.section(lm, vector, prompts, layer)))
    one = vector.select([rec["analysed_layer"]])
    ctx = Context(lm, one, alpha if alpha is not None else 1.0, prompts, st, run, fn, scorer_info["name"],
                  show_progress)
    d = run.step("dose", _timed(lambda: dose.section(ctx, alpha, rec["relative_norm"][str(ctx.layer)])))
    ctx = ctx.with_alpha(float(d["chosen_alpha"]))  # (extras, with the dose builds, are shared)
    card = Explanation(vector={**rec, "model": lm.name, "alpha": ctx.alpha, "n_prompts": len(prompts),
                               "scorer": scorer_info, "quick": quick}, dose=d)
    beh = _behaviour(ctx)
    card.vector["metric_gap"] = beh.gap
    card.vector["scored_positions"] = int(beh.pb.mask.sum())
    for name in progress(list(ANALYSES), desc="explain", enabled=show_progress):
        need = NEEDS.get(name)
        if need in card.unsupported:
            card.unsupported[name] = f"needs the {need} section ({card.unsupported[need]})"
            continue
        try:
            setattr(card, name, run.step(name, _timed(_bind(ANALYSES[name], ctx, beh))))
        except SteerscopeError as e:
            card.unsupported[name] = str(e)
    card.vector["timings"] = _timings(run, ["vector", "dose", "behaviour", *ANALYSES])
    card.verdict = verdict({k: v for k, v in card.to_dict().items() if v is not None})
    if out is not None:
        card.write(out)
    return card


def _behaviour(ctx: Context) -> Behaviour:
    """The reference batch (built once, stored with the run)."""
    def make() -> dict[str, Any]:
        beh = ctx.extras.get("builds", {}).get(ctx.alpha) or build(
            ctx.lm, ctx.prompts, ctx.vector, ctx.alpha, ctx.settings.n_tokens, ctx.settings.batch_size)
        ctx.save("behaviour", beh.tensors())
        return {"texts": beh.pb.texts, "gap": beh.gap, "scored_positions": int(beh.pb.mask.sum())}
    rec = ctx.run.step("behaviour", _timed(make))
    beh = Behaviour.from_tensors(ctx.load("behaviour"), rec["texts"])
    beh.pb.mask = beh.pb.mask.bool()
    return beh


def load_card(out: str | Path) -> dict[str, Any]:
    """Read ``out/card.json``."""
    p = Path(out) / "card.json"
    if not p.is_file():
        raise SteerscopeError(f"no card at {p}; run steerscope explain with --out {out}")
    data: dict[str, Any] = json.loads(p.read_text())
    return data


__all__ = ["KEYS", "Explanation", "Settings", "explain", "load_card"]
