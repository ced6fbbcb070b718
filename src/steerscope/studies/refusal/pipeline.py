"""``steerscope study refusal``: organism, direction selection, DIM / NTP / PO vectors, ASR report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from steerscope.errors import StudyError
from steerscope.runs import TIMING, Run, write_json
from steerscope.studies.refusal import records as rc
from steerscope.studies.refusal import steps
from steerscope.studies.refusal.config import Config


def run(cfg: Config, out: Path, device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return the summary (report path under ``"report"``).

    Example:
        >>> run(Config(n_test=20), Path("runs/refusal"))["report"]
    """
    torch.set_num_threads(cfg.threads)
    r = Run(out, config=cfg.identity(), force=force)
    organism = r.record(rc.ORGANISM_STEP, rc.OrganismRecord, lambda: steps.organism_step(cfg, r))
    lm = steps.load_study_model(cfg, r, device=device)
    sel = r.record(rc.SELECT_STEP, rc.SelectionRecord, lambda: steps.select_step(lm, cfg, r))
    dim = steps.study_vector(cfg, r, "refusal-dim")
    assert dim is not None
    layer = dim.layers[0]
    trained = None
    if not steps.use_shipped(cfg):
        a = max(cfg.alphas)
        data = r.record(rc.TRAINED_DATA_STEP, rc.TrainedDataRecord, lambda: steps.trained_data_step(lm, cfg, dim, a))
        trained = r.record(rc.TRAINED_STEP, rc.TrainedRecord, lambda: steps.trained_step(lm, cfg, r, data, layer, 1.0, 1.0))
    vectors = {n.split("-")[1].upper(): v for n in steps.VECTOR_NAMES if (v := steps.study_vector(cfg, r, n)) is not None}
    ev = r.record(rc.EVALUATE_STEP, rc.EvaluateRecord, lambda: steps.evaluate_step(lm, cfg, vectors))
    if cfg.matched_norm and "DIM" in vectors and len(vectors) > 1:
        matched = r.record(rc.MATCHED_STEP, rc.MatchedRecord, lambda: steps.evaluate_matched_step(lm, cfg, vectors))
        ev = replace(ev, steered=ev.steered + matched.steered)
    results = rc.Results(cfg.identity(), organism, sel, trained, ev, steps.cosines(vectors),
                         "shipped" if steps.use_shipped(cfg) else "this run",
                         rc.PickCheck(layer, dim.provenance.positions, [sel.layer, sel.position]))
    steps_run = (rc.ORGANISM_STEP, rc.SELECT_STEP, rc.EVALUATE_STEP) + ((rc.TRAINED_STEP,) if trained else ())
    write_json(r.folder / "results.json", results.to_json({n: _timing(r, n) for n in steps_run}))
    report = write_report(r.folder)
    return {"report": str(report), "results": str(r.folder / "results.json"), "layer": layer,
            "unsteered": ev.unsteered.counts(), "steered": [s.counts() for s in ev.steered], "steps": r.log}


def _timing(r: Run, name: str) -> dict[str, float]:
    """The store's timing keys of step ``name`` as its record holds them (kept in ``results.json``)."""
    return {k: v for k, v in r.load(name).items() if k in TIMING}


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the run's ``results.json``; return its path."""
    from steerscope.studies.refusal.report import write_report as write

    path = Path(out) / "results.json"
    if not path.is_file():
        raise StudyError(f"{out} has no results.json yet; run `steerscope study refusal --out {out}` to the end first")
    return write(Path(out), rc.Results.from_dict(json.loads(path.read_text())))
