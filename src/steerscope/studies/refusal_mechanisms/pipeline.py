"""``steerscope study refusal-mechanisms``: why refusal steering works, end to end and resumable.

Steps (each cached as ``steps/<name>.json`` in the run folder): attribution (EAP-IG) per vector and
setting, the EAP-IG vs exact patching check, circuits + faithfulness, circuit comparison,
frozen-attention ablations, svv logit lens, sparsification, IoU; then the HTML report.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from steerscope.runs import Run
from steerscope.studies.refusal_mechanisms import records as rc
from steerscope.studies.refusal_mechanisms import steps as St
from steerscope.studies.refusal_mechanisms.config import Config
from steerscope.studies.refusal_mechanisms.records import StudyRecords
from steerscope.vector import SteeringVector


def load_vectors(lm: Any, cfg: Config) -> dict[str, SteeringVector]:
    """The study's vectors, checked against the model, each at its first layer.

    Example:
        >>> load_vectors(lm, Config())["dim"].layers
    """
    vecs = {}
    for name, src in cfg.vectors.items():
        v = SteeringVector.load(src)
        v.check_compatible(lm)
        vecs[name] = v.select([v.layers[0]]) if len(v) > 1 else v
    return vecs


def run(cfg: Config, out: Path, device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return a summary with the report path under ``"report"``.

    Example:
        >>> run(Config(n_eval=8), Path("runs/refusal-mechanisms"))["summary"]["asr_bypass"]
    """
    import steerscope as ss

    r = Run(out, config=cfg.identity(), force=force)
    lm = ss.load_model(cfg.model, device=device, dtype=cfg.dtype)
    vecs = load_vectors(lm, cfg)
    names = list(vecs)
    for s in rc.SETTINGS:  # Table 1 first: it needs no attribution, and it is the headline
        r.record(rc.ablations_step(s), rc.AblationsRecord, partial(St.step_ablations, r, lm, cfg, vecs["dim"], s))
    for n in names:
        for s in rc.SETTINGS:
            r.record(rc.attribution_step(n, s), rc.AttributionRecord,
                     partial(St.step_attribution, r, lm, cfg, n, vecs[n], s))
    r.record(rc.EXACT_CHECK, rc.ExactCheckRecord, lambda: St.step_exact_check(r, lm, cfg, vecs["dim"]))
    for n in names:
        for s in rc.SETTINGS:
            r.record(rc.circuits_step(n, s), rc.CircuitsRecord, partial(St.step_circuits, r, lm, cfg, n, vecs[n], s))
    for s in rc.SETTINGS:
        r.record(rc.circuit_compare_step(s), rc.CircuitCompareRecord,
                 partial(St.step_circuit_compare, r, lm, cfg, vecs, s))
    for n in names:
        r.record(rc.svv_step(n), rc.SvvRecord, partial(St.step_svv, r, lm, cfg, n, vecs[n]))
        r.record(rc.sparsity_step(n), rc.SparsityRecord, partial(St.step_sparsity, r, lm, cfg, n, vecs[n]))
    r.record(rc.iou_step(), rc.IouRecord, lambda: St.step_iou(r, lm, cfg, names, vecs=vecs))
    report = _write(r, cfg, names)
    return {"report": str(report), "out": str(r.folder), "summary": summary(r, names), "log": r.log}


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the finished steps (unfinished ones are left out); return its path.

    Example:
        >>> write_report(Path("runs/refusal-mechanisms")).name
        'report.html'
    """
    cfg = Config.load(out)
    return _write(Run(out), cfg, list(cfg.vectors))


def _write(run_: Run, cfg: Config, names: list[str]) -> Path:
    from steerscope.studies.refusal_mechanisms.report import write_report as write

    return write(run_, cfg, StudyRecords.load(run_, names))


def summary(run_: Run, names: list[str]) -> dict[str, Any]:
    """The headline numbers (the paper A findings to check), from the finished steps' records.

    Example:
        >>> summary(Run("runs/refusal-mechanisms"), ["dim", "po"])["asr_bypass"]["none"]
    """
    from steerscope.studies.refusal_mechanisms.report import table1_claims

    recs = StudyRecords.load(run_, names)
    out: dict[str, Any] = {}
    for s in rc.SETTINGS:
        if s in recs.ablations:
            out[f"asr_{s}"] = {m: recs.ablations[s].asr(m) for m in rc.ABLATION_MODES}
        if s in recs.compare:
            out[f"overlap_{s}"] = recs.compare[s].overlap
            out[f"overlap_common_{s}"] = recs.compare[s].overlap_common
        for n in names:
            if (c := recs.circuits.get((n, s))) is not None:
                out[f"minimal_circuit_{n}_{s}"] = {"edges": c.minimal_edges, "of": c.n_edges_total,
                                                   "reached": c.reached_threshold,
                                                   "heldout": c.heldout.to_dict() if c.heldout else None}
    out["attribution_fallbacks"] = _fallbacks(recs).to_dict()
    out["table1_claims"] = [{"setting": s, **c.to_dict()} for s, c in table1_claims(recs.ablations)]
    if recs.exact is not None:
        out["eapig_vs_exact"] = {k: v for k, v in recs.exact.to_dict().items() if k.startswith(("spearman", "time"))}
    for n, sp in recs.sparsity.items():
        if sp.asr:
            out[f"sparsity_{n}_bypass"] = {"sparsities": sp.sparsities, "dense": sp.dense_asr, **sp.asr}
        if sp.paper is not None:
            paper = sp.paper.to_dict()
            out[f"sparsity_paper_rule_{n}_bypass"] = {k: paper.get(k) for k in ("taus", "sparsity", "asr", "n")}
    return out


def _fallbacks(recs: StudyRecords) -> rc.Fallbacks:
    """How often the flip filter's "fewer than 2 flips: all prompts" fallback fired, over the attribution sets."""
    fired = [f"{n}_{s}" for (n, s), a in recs.attribution.items() if a.fallback_fired()]
    return rc.Fallbacks(len(fired), len(recs.attribution), fired)
