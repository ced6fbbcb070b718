"""``steerscope study identifiability``: the end-to-end run and the report from its records."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from steerscope.runs import Run, without_timing
from steerscope.studies.identifiability.config import Config

Cell = tuple[str, str, int, str]  # (trait or "*", method, seed, prompt set)


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


def _step_name(cell: Cell) -> str:
    trait, method, seed, pset = cell
    return f"gen_{'none' if trait == '*' else trait}_{method}_s{seed}_{pset}"


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

    t0 = time.time()
    run_ = Run(out, config=cfg.identity(), force=force)
    lm = ss.load_model(cfg.model, device=device)
    vrec = run_.step("vectors", lambda: steps.vectors(run_, lm, cfg))
    vecs = steps.load_vectors(vrec)
    inject = vrec["inject_layer"]
    built, srec = steps.scorers(cfg, Embedder())
    run_.step("scorers", lambda: srec)
    neutral = neutral_prompts(cfg.n_prompts)
    shift = [r["prompt"] for r in steps.shift_prompts(cfg.n_shift_prompts)]
    gens = {}
    for cell in progress(cells(cfg), desc="generation cells"):
        trait, method, seed, pset = cell
        prompts = neutral if pset == "neutral" else shift
        alphas = cfg.alphas if pset == "neutral" else (cfg.probe_alpha,)
        v = None if method == "none" else vecs[f"{trait}_{method}"]
        gens[f"{trait}|{method}|{seed}|{pset}"] = without_timing(run_.step(_step_name(cell), lambda: steps.generate_cell(
            lm, cfg, prompts, v, trait, seed, inject, alphas)))
    scores = without_timing(run_.step("scores", lambda: steps.score_texts(built, gens)))
    usable = {t: {s.kind: s.usable for s in built[t]} for t in cfg.traits}
    run_.step("effects", lambda: {
        "neutral": steps.effects(cfg, scores, srec["primary"], usable),
        "shift": steps.effects(cfg, scores, srec["primary"], usable, prompts="shift", alphas=[cfg.probe_alpha])
        if cfg.shift else []})
    run_.step("logits", lambda: steps.logits(lm, cfg, vecs, inject))
    run_.step("nullspace", lambda: steps.nullspace(lm, cfg, vecs, vrec["layer"]))
    path, summary = _write(run_, cfg)
    return {"report": str(path), "run": str(run_.folder), **summary, "steps": run_.log,
            "wall_seconds": round(time.time() - t0, 1)}


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the run's step records; return its path."""
    return _write(Run(out), Config.load(out))[0]


def _write(run_: Run, cfg: Config) -> tuple[Path, dict[str, Any]]:
    from steerscope.studies.identifiability import report

    rec = {name: _record(run_, name) for name in ("vectors", "scorers", "scores", "effects", "logits", "nullspace")}
    gens = {"|".join(map(str, c)): _record(run_, _step_name(c)) for c in cells(cfg)}
    path = report.write(run_, cfg, rec["vectors"], rec["scorers"], gens, rec["scores"], rec["effects"], rec["logits"],
                        rec["nullspace"])
    return path, report.summary(cfg, rec["vectors"], rec["scorers"], rec["effects"], rec["logits"], rec["nullspace"])


def _record(run_: Run, name: str) -> dict[str, Any]:
    return without_timing(run_.load(name))
