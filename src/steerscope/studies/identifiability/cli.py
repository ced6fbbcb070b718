"""``steerscope study identifiability``: arguments and the end-to-end run."""

from __future__ import annotations

import argparse
import time
from typing import Any

from steerscope.errors import StudyError
from steerscope.studies.identifiability.config import Config


def _floats(s: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise StudyError(f"{what} takes numbers separated by commas, got {s!r}") from None


def _ints(s: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise StudyError(f"{what} takes integers separated by commas, got {s!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Config()
    p.add_argument("--traits", default=",".join(d.traits), help="comma-separated: formality,sentiment,politeness")
    p.add_argument("--layer", type=int, default=None, help="extraction layer (default n_layers // 2)")
    p.add_argument("--offset", type=int, default=d.offset, choices=(0, 1),
                   help="inject at layer + offset (1 = paper C's code: output of layers[L//2])")
    p.add_argument("--methods", default=",".join(d.methods), help="vectors in the behavioural test: dim,pca")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in d.alphas), help="e.g. 2,4,6 (none is always run)")
    p.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="sampling / v_perp seeds, e.g. 0,1")
    p.add_argument("--n-prompts", type=int, default=d.n_prompts, help="neutral prompts per condition (<= 40)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--ks", default=",".join(map(str, d.ks)), help="orthogonal subspace dimensions")
    p.add_argument("--n-k-prompts", type=int, default=d.n_k_prompts)
    p.add_argument("--n-shift-prompts", type=int, default=d.n_shift_prompts, help="shift prompts (<= 30)")
    p.add_argument("--k-traits", type=int, default=d.k_traits, help="traits (first N) in the k-subspace test")
    p.add_argument("--no-shift", action="store_true", help="skip the behavioural test on shift prompts")
    p.add_argument("--shift-alpha", type=float, default=None, help="alpha of the shift and k tests (default: middle)")
    p.add_argument("--n-cov-prompts", type=int, default=d.n_cov_prompts)
    p.add_argument("--n-jac-prompts", type=int, default=d.n_jac_prompts)


def config_from(a: argparse.Namespace) -> Config:
    return Config(
        model=a.model, traits=tuple(t.strip() for t in a.traits.split(",") if t.strip()), layer=a.layer,
        offset=a.offset, methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
        alphas=_floats(a.alphas, "--alphas"), seeds=_ints(a.seeds, "--seeds"), n_prompts=a.n_prompts,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, ks=_ints(a.ks, "--ks"),
        n_k_prompts=a.n_k_prompts, n_shift_prompts=a.n_shift_prompts, k_traits=a.k_traits, shift=not a.no_shift, shift_alpha=a.shift_alpha,
        n_cov_prompts=a.n_cov_prompts, n_jac_prompts=a.n_jac_prompts, seed=a.seed,
    )


def run_study(cfg: Config, out: str, device: str = "cpu", force: bool = False, show_progress: bool = True
              ) -> dict[str, Any]:
    """Run every step (resuming finished ones) and write the report; returns the JSON summary."""
    import steerscope as ss
    from steerscope.metrics.classifiers import Embedder
    from steerscope.progress import progress
    from steerscope.studies.identifiability import report, steps
    from steerscope.studies.runner import Run

    run_ = Run(out, config=cfg.to_dict(), force=force)
    lm = ss.load_model(cfg.model, device=device)
    vrec = run_.step("vectors", lambda: steps.vectors(run_, lm, cfg))
    vecs = steps.load_vectors(vrec)
    inject = vrec["inject_layer"]
    embedder = Embedder()
    built, srec = steps.scorers(cfg, embedder)
    run_.step("scorers", lambda: srec)
    neutral = steps.neutral_prompts(cfg.n_prompts)
    shift = [r["prompt"] for r in steps.shift_prompts(cfg.n_shift_prompts)]
    cells: list[tuple[str, str, int, str]] = []
    for seed in cfg.seeds:
        cells.append(("*", "none", seed, "neutral"))
        cells += [(t, m, seed, "neutral") for t in cfg.traits for m in cfg.methods]
    if cfg.shift:
        cells.append(("*", "none", cfg.seeds[0], "shift"))
        cells += [(t, "dim", cfg.seeds[0], "shift") for t in cfg.traits]
    gens = {}
    for trait, method, seed, pset in progress(cells, desc="generation cells", enabled=show_progress):
        name = f"gen_{'none' if trait == '*' else trait}_{method}_s{seed}_{pset}"
        prompts = neutral if pset == "neutral" else shift
        alphas = cfg.alphas if pset == "neutral" else (cfg.probe_alpha,)
        v = None if method == "none" else vecs[f"{trait}_{method}"]
        gens[f"{trait}|{method}|{seed}|{pset}"] = run_.step(name, lambda: steps.generate_cell(
            lm, cfg, prompts, v, trait, seed, inject, alphas))
    for g in gens.values():
        g.pop("_seconds", None)
    scores = run_.step("scores", lambda: steps.score_texts(built, gens))
    scores.pop("_seconds", None)
    usable = {t: {s.kind: s.usable for s in built[t]} for t in cfg.traits}
    eff = run_.step("effects", lambda: {
        "neutral": steps.effects(cfg, scores, srec["primary"], usable),
        "shift": steps.effects(cfg, scores, srec["primary"], usable, prompts="shift", alphas=[cfg.probe_alpha])
        if cfg.shift else []})
    lrec = run_.step("logits", lambda: steps.logits(lm, cfg, vecs, inject))
    nrec = run_.step("nullspace", lambda: steps.nullspace(lm, cfg, vecs, vrec["layer"]))
    path = report.write(run_, cfg, vrec, srec, gens, scores, eff, lrec, nrec)
    return {"report": str(path), "run": str(run_.folder), **report.summary(cfg, vrec, srec, eff, lrec, nrec),
            "steps": run_.log}


def run(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    cfg = config_from(a)
    out = run_study(cfg, a.out, device=a.device, force=a.force, show_progress=not a.json)
    out["wall_seconds"] = round(time.time() - t0, 1)
    return out
