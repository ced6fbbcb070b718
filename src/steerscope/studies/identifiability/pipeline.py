"""``steerscope study identifiability``: the end-to-end run and the report from its records."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from steerscope.runs import Run
from steerscope.studies.identifiability import records as rc
from steerscope.studies.identifiability.config import PCA_PAPER, Config
from steerscope.studies.identifiability.records import Cell


def cells(cfg: Config) -> list[Cell]:
    """The generation cells: per seed the unsteered and each (trait, method); then the shift cells."""
    out: list[Cell] = []
    for seed in cfg.seeds:
        out.append(("*", "none", seed, "neutral"))
        out += [(t, m, seed, "neutral") for t in cfg.traits for m in cfg.methods]
    if cfg.shift:
        out.append(("*", "none", cfg.seeds[0], "shift"))
        out += [(t, "dim", cfg.seeds[0], "shift") for t in cfg.traits]
    return out


def run(cfg: Config, out: Path, device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Run every step (resuming finished ones) and write the report; return the JSON summary.

    Example:
        >>> run(Config(traits=("formality",)), Path("runs/identifiability"))["report"]
    """
    import steerscope as ss
    from steerscope.data import neutral_prompts
    from steerscope.metrics.classifiers import Embedder
    from steerscope.progress import progress
    from steerscope.studies.identifiability import steps
    from steerscope.studies.identifiability.equivalence import equivalence

    t0 = time.time()
    run_ = Run(out, config=cfg.identity(), force=force)
    lm = ss.load_model(cfg.model, device=device, dtype=cfg.dtype)
    vrec = run_.record(rc.VECTORS, rc.VectorsRecord, lambda: steps.vectors(run_, lm, cfg))
    vecs = steps.load_vectors(vrec)
    inject = vrec.inject_layer
    built, srec = steps.scorers(cfg, Embedder())
    run_.record(rc.SCORERS, rc.ScorersRecord, lambda: srec)
    neutral = neutral_prompts(cfg.n_prompts)
    shift = [r["prompt"] for r in steps.shift_prompts(cfg.n_shift_prompts)]
    gens = {}
    for cell in progress(cells(cfg), desc="generation cells"):
        trait, method, seed, pset = cell
        prompts = neutral if pset == "neutral" else shift
        alphas = cfg.alphas if pset == "neutral" else (cfg.probe_alpha,)
        v = None if method == "none" else vecs[f"{trait}_{method}"]
        conds = ("v",) if method in PCA_PAPER else steps.CONDITIONS  # paper C's PCA is compared with DIM's v only
        gens[rc.cell_key(cell)] = run_.record(rc.generation_step(cell), rc.Generations, lambda: steps.generate_cell(
            lm, cfg, prompts, v, trait, seed, inject, alphas, conds))
    scores = run_.record(rc.SCORES, rc.Scores, lambda: steps.score_texts(built, gens))
    usable = {t: {s.kind: s.usable for s in built[t]} for t in cfg.traits}
    run_.record(rc.EFFECTS, rc.EffectsRecord, lambda: steps.effects_step(cfg, scores, srec, usable))
    run_.record(rc.EQUIVALENCE, rc.EquivalenceRecord, lambda: equivalence(cfg, scores.cells, srec.primary))
    run_.record(rc.LOGITS, rc.LogitsRecord, lambda: steps.logits(lm, cfg, vecs, inject))
    run_.record(rc.NULLSPACE, rc.NullspaceRecord, lambda: steps.nullspace(lm, cfg, vecs, vrec.layer))
    path, summary = _write(run_, cfg)
    return {"report": str(path), "run": str(run_.folder), **summary, "steps": run_.log,
            "wall_seconds": round(time.time() - t0, 1)}


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the run's step records; return its path."""
    return _write(Run(out), Config.load(out))[0]


def _write(run_: Run, cfg: Config) -> tuple[Path, dict[str, Any]]:
    from steerscope.studies.identifiability import report

    vrec, srec = run_.load_record(rc.VECTORS, rc.VectorsRecord), run_.load_record(rc.SCORERS, rc.ScorersRecord)
    eff, lrec = run_.load_record(rc.EFFECTS, rc.EffectsRecord), run_.load_record(rc.LOGITS, rc.LogitsRecord)
    nrec = run_.load_record(rc.NULLSPACE, rc.NullspaceRecord)
    eq = run_.load_record(rc.EQUIVALENCE, rc.EquivalenceRecord)
    gens = {rc.cell_key(c): run_.load_record(rc.generation_step(c), rc.Generations) for c in cells(cfg)}
    path = report.write(run_, cfg, vrec, srec, gens, run_.load_record(rc.SCORES, rc.Scores), eff, lrec, nrec, eq)
    return path, report.summary(cfg, vrec, srec, eff, lrec, nrec, eq)

