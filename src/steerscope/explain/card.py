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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from steerscope.analyses.records import Record
from steerscope.data import neutral_prompts
from steerscope.errors import DataError, SteerscopeError, VectorError
from steerscope.explain import dose, intervals, vector_info
from steerscope.explain.behaviour import Behaviour, build
from steerscope.explain.context import Context, ScoreFn, Settings
from steerscope.explain.records import (
    AttributionRecord,
    CircuitRecord,
    Claim,
    DoseRecord,
    FrozenRecord,
    IdentifiabilityRecord,
    LensRecord,
    SparsityRecord,
    VectorRecord,
)
from steerscope.explain.scorers import resolve_scorer
from steerscope.explain.sections import SECTIONS, Section
from steerscope.explain.verdict import claims_of, verdict
from steerscope.generation import as_texts, context_length
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.runs import MemoryRun, Run, write_json
from steerscope.vector import SteeringVector, check_finite

KEYS = ("vector", "dose", "lens", "attribution", "frozen", "circuit", "sparsity", "identifiability", "claims",
        "verdict", "unsupported")
RECORDS: dict[str, type[Record]] = {"vector": VectorRecord, "dose": DoseRecord,
                                    **{sec.name: sec.record for sec in SECTIONS}}


@dataclass
class Explanation:
    """The mechanism card: one typed record per section (None when unsupported), the claims (three-way
    verdicts), the verdict paragraph, and why sections were skipped. ``to_dict()`` is ``card.json``;
    ``from_dict`` reads it back into records."""

    vector: VectorRecord
    dose: DoseRecord | None = None
    lens: LensRecord | None = None
    attribution: AttributionRecord | None = None
    frozen: FrozenRecord | None = None
    circuit: CircuitRecord | None = None
    sparsity: SparsityRecord | None = None
    identifiability: IdentifiabilityRecord | None = None
    claims: list[Claim] = field(default_factory=list)
    verdict: str = ""
    unsupported: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with exactly the card keys (non-finite numbers become None)."""
        return {k: _clean(_plain(getattr(self, k))) for k in KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        """The card of a ``card.json`` object (records rebuilt; nulls read back as NaN where a number is due)."""
        recs = {k: RECORDS[k].from_dict(data[k]) if data.get(k) is not None else None for k in RECORDS}
        return cls(**recs, claims=[Claim.from_dict(c) for c in data.get("claims") or []],  # type: ignore[arg-type]
                   verdict=data.get("verdict", ""), unsupported=dict(data.get("unsupported") or {}))

    def section(self, name: str) -> Record | None:
        return getattr(self, name)  # type: ignore[no-any-return]

    def write(self, out: str | Path) -> tuple[Path, Path]:
        """Write ``out/card.json`` and ``out/card.html``."""
        from steerscope.explain.html import write_card

        out = Path(out)
        write_json(out / "card.json", self.to_dict())
        return out / "card.json", write_card(self, out / "card.html")


def _plain(x: Any) -> Any:
    if isinstance(x, Record):
        return x.to_dict()
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _bind(fn: Callable[[Context, Behaviour], Record], ctx: Context, beh: Behaviour) -> Callable[[], Record]:
    return lambda: fn(ctx, beh)


def _digest(vector: SteeringVector, prompts: Sequence[str]) -> tuple[str, str]:
    h = hashlib.sha256()
    for k in vector.layers:
        h.update(str(k).encode())
        h.update(vector[k].float().numpy().tobytes())
    return h.hexdigest()[:16], hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def card_config(model: str, vector: SteeringVector, prompts: Sequence[str], alpha: float | None, layer: int | None,
                scorer: str | None, settings: Settings, sections: Sequence[str] | None) -> dict[str, Any]:
    """What a card folder's ``config.json`` holds (the command line checks an existing ``--out`` with it
    before the model loads).

    Example:
        >>> card_config("smollm2-135m", vec, neutral_prompts(16), 6.0, None, None, Settings(), None)
    """
    vsha, psha = _digest(vector, prompts)
    return {"model": model, "vector": vsha, "prompts": psha, "alpha": alpha, "layer": layer, "scorer": scorer,
            "settings": settings.to_dict(), "sections": list(sections or [])}


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
            show_progress: bool = True, sections: Sequence[str] | None = None) -> Explanation:
    """Explain why a steering vector works on a model: the mechanism card.

    Args:
        lm: the model. vector: any resid_pre :class:`SteeringVector` (hand-made, imported, shipped).
        prompts: prompts to steer, a bare string being one (default: the shipped neutral set, 16 or 8 with ``quick``).
        alpha: the scale; None picks the upper end of the dose section's recommended range.
        scorer: None, ``"refusal"``, a trait (``formality``, ``sentiment``, ``politeness``) or a
            callable ``texts -> scores``; adds scorer means to the generation-based sections.
        quick: small sizes (:meth:`Settings.quick`). out: a folder: resumable, writes card.json/.html.
        layer: the layer to analyse for a multi-layer vector (default: largest relative norm).
        sections: compute only these sections after ``vector`` and ``dose`` (default: all of
            :data:`~steerscope.explain.sections.SECTIONS`); the others are listed as not computed.

    Returns:
        :class:`Explanation`.

    Example:
        >>> card = explain(lm, ss.SteeringVector.load("formality.safetensors"), alpha=6.0, quick=True)
        >>> card.frozen.ov.effect_retained  # Estimate(value=..., ci95=(lo, hi), n=8)
    """
    check_inputs(vector, alpha, layer)
    vector.check_compatible(lm)
    st = settings or (Settings.quick() if quick else Settings())
    prompts = as_texts(prompts) if prompts else neutral_prompts(8 if quick else 16)
    _check_context(lm, prompts, max(st.n_tokens, st.gen_tokens))
    fn, scorer_info = resolve_scorer(scorer)
    config = card_config(lm.name, vector, prompts, alpha, layer, scorer_info["name"], st, sections)
    run: Run | MemoryRun = Run(out, config=config, force=force) if out is not None else MemoryRun()
    info = run.record("vector", VectorRecord, lambda: vector_info.section(lm, vector, prompts, layer))
    one = vector.select([info.analysed_layer])
    ctx = Context(lm, one, alpha if alpha is not None else 1.0, prompts, st, run, fn, scorer_info["name"],
                  show_progress)
    d = run.record("dose", DoseRecord, lambda: dose.section(ctx, alpha, info.relative_norm[str(ctx.layer)]))
    ctx = ctx.with_alpha(float(d.chosen_alpha))  # (the dose section's builds are shared)
    beh = _behaviour(ctx)
    ms, mb = beh.m_steer.double().numpy(), beh.m_base.double().numpy()
    card = Explanation(vector=replace(info, model=lm.name, name=vector.provenance.method or "", alpha=ctx.alpha,
                                      n_prompts=len(prompts), scorer=scorer_info, quick=quick,
                                      metric_gap=intervals.mean(ms - mb, st.n_boot, st.seed),
                                      scored_positions=int(beh.pb.mask.sum())), dose=d)
    todo = [sec for sec in SECTIONS if sections is None or sec.name in sections]
    _run_sections(card, run, ctx, beh, todo, show_progress)
    timed = ["vector", "dose", "behaviour", *(sec.name for sec in todo)]
    card.vector = replace(card.vector, timings={n: run.timing(n) for n in timed if run.done(n)})
    card.claims = claims_of(card)
    card.verdict = verdict(card)
    if out is not None:
        card.write(out)
    return card


def _run_sections(card: Explanation, run: Run | MemoryRun, ctx: Context, beh: Behaviour, todo: Sequence[Section],
                  show_progress: bool) -> None:
    """Fill the card's sections in order; a section that raises, or needs one that is missing, is listed
    under ``unsupported`` with the reason."""
    for sec in progress(todo, desc="explain", enabled=show_progress):
        missing = [n for n in sec.needs if n in card.unsupported or getattr(card, n) is None]
        if missing:
            why = card.unsupported.get(missing[0], "not computed")
            card.unsupported[sec.name] = f"needs the {missing[0]} section ({why})"
            continue
        try:
            setattr(card, sec.name, run.record(sec.name, sec.record, _bind(sec.compute, ctx, beh)))
        except SteerscopeError as e:
            card.unsupported[sec.name] = str(e)


def _behaviour(ctx: Context) -> Behaviour:
    """The reference batch (built once, stored with the run)."""
    def make() -> dict[str, Any]:
        beh = ctx.builds.get(ctx.alpha) or build(
            ctx.lm, ctx.prompts, ctx.vector, ctx.alpha, ctx.settings.n_tokens, ctx.settings.batch_size)
        ctx.save("behaviour", beh.tensors())
        return {"texts": beh.pb.texts, "gap": beh.gap, "scored_positions": int(beh.pb.mask.sum())}
    rec = ctx.run.step("behaviour", make)
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
