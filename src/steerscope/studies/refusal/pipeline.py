"""``steerscope study refusal``: organism, direction selection, DIM / NTP / PO vectors, ASR report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from steerscope.errors import StudyError
from steerscope.runs import Run, write_json
from steerscope.studies.refusal import steps
from steerscope.studies.refusal.config import Config


def run(cfg: Config, out: Path, device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return the summary (report path under ``"report"``).

    Example:
        >>> run(Config(n_test=20), Path("runs/refusal"))["report"]
    """
    torch.set_num_threads(cfg.threads)
    r = Run(out, config=cfg.identity(), force=force)
    organism = r.step("organism", lambda: steps.organism_step(cfg, r))
    lm = steps.load_study_model(cfg, r, device=device)
    sel = r.step("select", lambda: steps.select_step(lm, cfg, r))
    dim = steps.study_vector(cfg, r, "refusal-dim")
    assert dim is not None
    layer = dim.layers[0]
    trained: dict[str, Any] = {}
    if not steps.use_shipped(cfg):
        a = max(cfg.alphas)
        data = r.step("trained_data", lambda: steps.trained_data_step(lm, cfg, dim, a))
        trained = r.step("trained", lambda: steps.trained_step(lm, cfg, r, data, layer, 1.0, 1.0))
    vectors = {n.split("-")[1].upper(): v for n in steps.VECTOR_NAMES if (v := steps.study_vector(cfg, r, n)) is not None}
    ev = r.step("evaluate", lambda: steps.evaluate_step(lm, cfg, vectors))
    if cfg.matched_norm and "DIM" in vectors and len(vectors) > 1:
        matched = r.step("evaluate_matched", lambda: steps.evaluate_matched_step(lm, cfg, vectors))
        ev = dict(ev, steered=ev["steered"] + matched["steered"])
    results = {"config": cfg.identity(), "organism": organism, "select": sel, "trained": trained, "evaluate": ev,
               "cosines": steps.cosines(vectors),
               "vector_source": "shipped" if steps.use_shipped(cfg) else "this run",
               "shipped_pick_matches": {"layer": layer, "position": dim.provenance.positions,
                                        "recomputed": [sel["layer"], sel["position"]]}}
    write_json(r.folder / "results.json", results)
    report = write_report(r.folder)
    summary = {"report": str(report), "results": str(r.folder / "results.json"), "layer": layer,
               "unsteered": {k: v for k, v in ev["unsteered"].items() if k != "samples"},
               "steered": [{k: v for k, v in s.items() if k != "samples"} for s in ev["steered"]],
               "steps": r.log}
    return summary


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the run's ``results.json``; return its path."""
    from steerscope.studies.refusal.report import write_report as write

    path = Path(out) / "results.json"
    if not path.is_file():
        raise StudyError(f"{out} has no results.json yet; run `steerscope study refusal --out {out}` to the end first")
    return write(Path(out), json.loads(path.read_text()))
