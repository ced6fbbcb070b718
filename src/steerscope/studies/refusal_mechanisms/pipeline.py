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
from steerscope.studies.refusal_mechanisms import steps as St
from steerscope.studies.refusal_mechanisms.config import Config


def load_vectors(lm: Any, cfg: Config) -> dict[str, Any]:
    from steerscope.vector import SteeringVector

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

    run_ = Run(out, config=cfg.identity(), force=force)
    lm = ss.load_model(cfg.model, device=device, dtype=cfg.dtype)
    vecs = load_vectors(lm, cfg)
    names = list(vecs)
    for setting in St.SETTINGS:  # Table 1 first: it needs no attribution, and it is the headline
        run_.step(f"ablations_{setting}", partial(St.step_ablations, run_, lm, cfg, vecs["dim"], setting))
    for n in names:
        for setting in St.SETTINGS:
            run_.step(f"attribution_{n}_{setting}", partial(St.step_attribution, run_, lm, cfg, n, vecs[n], setting))
    run_.step("exact_check", lambda: St.step_exact_check(run_, lm, cfg, vecs["dim"]))
    for n in names:
        for setting in St.SETTINGS:
            run_.step(f"circuits_{n}_{setting}", partial(St.step_circuits, run_, lm, cfg, n, vecs[n], setting))
    for setting in St.SETTINGS:
        run_.step(f"circuit_compare_{setting}", partial(St.step_circuit_compare, run_, lm, cfg, vecs, setting))
    for n in names:
        run_.step(f"svv_{n}", partial(St.step_svv, run_, lm, cfg, n, vecs[n]))
        run_.step(f"sparsity_{n}_bypass", partial(St.step_sparsity, run_, lm, cfg, n, vecs[n]))
    run_.step("iou_bypass", lambda: St.step_iou(run_, lm, cfg, names, vecs=vecs))
    report = _write(run_, cfg, names)
    return {"report": str(report), "out": str(run_.folder), "summary": summary(run_, names), "log": run_.log}


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the finished steps (unfinished ones are left out); return its path."""
    cfg = Config.load(out)
    return _write(Run(out), cfg, list(cfg.vectors))


def _write(run_: Run, cfg: Config, names: list[str]) -> Path:
    from steerscope.studies.refusal_mechanisms.report import write_report as write

    return write(run_, cfg, names)


def summary(run_: Run, names: list[str]) -> dict[str, Any]:
    """The headline numbers (the paper A findings to check)."""
    out: dict[str, Any] = {}
    for setting in St.SETTINGS:
        if run_.done(f"ablations_{setting}"):
            a = run_.load(f"ablations_{setting}")
            out[f"asr_{setting}"] = {k: a[k] for k in ("unsteered", "none", "qk", "ov", "svv", "mlp")}
        if run_.done(f"circuit_compare_{setting}"):
            out[f"overlap_{setting}"] = run_.load(f"circuit_compare_{setting}")["overlap"]
            out[f"overlap_common_{setting}"] = run_.load(f"circuit_compare_{setting}").get("overlap_common")
        for n in names:
            if run_.done(f"circuits_{n}_{setting}"):
                c = run_.load(f"circuits_{n}_{setting}")
                out[f"minimal_circuit_{n}_{setting}"] = {"edges": c["minimal_edges"], "of": c["n_edges_total"],
                                                         "reached": c["reached_threshold"], "heldout": c.get("heldout")}
    out["attribution_fallbacks"] = _fallbacks(run_, names)
    from steerscope.studies.refusal_mechanisms.report import table1_claims

    arec = {s: run_.load(f"ablations_{s}") for s in St.SETTINGS if run_.done(f"ablations_{s}")}
    out["table1_claims"] = [{"setting": s, **c.to_dict()} for s, c in table1_claims(arec)]
    if run_.done("exact_check"):
        out["eapig_vs_exact"] = {k: v for k, v in run_.load("exact_check").items() if k.startswith(("spearman", "time"))}
    for n in names:
        if run_.done(f"sparsity_{n}_bypass"):
            sp = run_.load(f"sparsity_{n}_bypass")
            if sp["asr"]:
                out[f"sparsity_{n}_bypass"] = {"sparsities": sp["sparsities"], "dense": sp.get("dense_asr"), **sp["asr"]}
            if "paper" in sp:
                out[f"sparsity_paper_rule_{n}_bypass"] = {k: sp["paper"].get(k) for k in ("taus", "sparsity", "asr", "n")}
    return out


def _fallbacks(run_: Run, names: list[str]) -> dict[str, Any]:
    """How often the flip filter's "fewer than 2 flips: all prompts" fallback fired, over the attribution sets."""
    fired, total = [], 0
    for n in names:
        for setting in St.SETTINGS:
            if run_.done(f"attribution_{n}_{setting}"):
                a = run_.load(f"attribution_{n}_{setting}")
                total += 1
                if a.get("fallback_all_prompts", a["n_flipped"] < 2):
                    fired.append(f"{n}_{setting}")
    return {"fired": len(fired), "of": total, "sets": fired}
