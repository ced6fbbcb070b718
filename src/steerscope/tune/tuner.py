"""``tune``: split, extract on train, search on validation, measure once on test, write the answer
into the vector file (see the package docstring for the steps)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from steerscope.data import neutral_prompts
from steerscope.errors import DataError, SteerscopeError
from steerscope.explain import intervals
from steerscope.explain.scorers import resolve_scorer
from steerscope.explain.vector_info import mean_resid_norms
from steerscope.extract import METHODS, Aggregator, extract
from steerscope.models.lm import LM
from steerscope.runs import MemoryRun, Run, write_json
from steerscope.steer import Positions as Spec
from steerscope.steer import check_positions
from steerscope.tune import search
from steerscope.tune.data import Pair, pairs_of, split
from steerscope.tune.objective import Evaluator, ScoreFn, penalized
from steerscope.tune.records import Positions, Recommended, SearchRecord, Settings, Split, TestFigure, Trial, TuneResult
from steerscope.vector import SteeringVector, Use, dataset_hash

LOGODDS = "teacher-forced log-odds (nats)"


def default_layers(n_layers: int, most: int = 12) -> list[int]:
    """Up to ``most`` evenly spaced layers from 15 % to 85 % of the depth (at least layer 1).

    Example:
        >>> default_layers(4)
        [1, 2, 3]
    """
    lo, hi = max(1, round(0.15 * n_layers)), max(1, min(n_layers - 1, round(0.85 * n_layers)))
    span = list(range(lo, hi + 1))
    if len(span) <= most:
        return span
    return sorted({span[round(i)] for i in np.linspace(0, len(span) - 1, most)})


@dataclass(frozen=True)
class _Inputs:
    """Everything ``tune`` checked before any model work."""

    layers: list[int]
    positions: list[Positions]
    budget: int
    scorer: ScoreFn | None
    scorer_name: str
    method_name: str


def check(lm: LM, method: str | Aggregator, scorer: str | ScoreFn | None, layers: Sequence[int] | None,
          positions: Sequence[Spec], kl_budget: float, budget_evals: int | None, settings: Settings) -> _Inputs:
    """Validate ``tune``'s arguments (:class:`SteerscopeError` with the fix) and fill in the defaults."""
    if isinstance(method, str) and method not in METHODS:
        raise DataError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or pass a function")
    if not (math.isfinite(kl_budget) and kl_budget > 0):
        raise SteerscopeError(f"kl_budget must be a positive number of nats, got {kl_budget}")
    if budget_evals is not None and budget_evals < 1:
        raise SteerscopeError(f"budget_evals must be at least 1, got {budget_evals}")
    lo, hi = settings.scales
    if not (0 < lo <= hi and math.isfinite(hi)) or settings.n_alphas < 1 or settings.rungs < 1:
        raise SteerscopeError(f"settings: scales must satisfy 0 < lo <= hi (got {settings.scales}), n_alphas and "
                              "rungs at least 1")
    chosen = sorted(set(layers)) if layers is not None else default_layers(lm.n_layers)
    bad = [k for k in chosen if not 0 <= k < lm.n_layers]
    if bad or not chosen:
        raise SteerscopeError(f"layers {bad or '[]'} out of range: {lm.name} has layers 0..{lm.n_layers - 1}")
    specs: list[Positions] = [p if isinstance(p, str) else list(p) for p in map(check_positions, positions)]
    if not specs:
        raise SteerscopeError("give at least one positions spec, e.g. positions=['all', 'prompt']")
    fn, info = resolve_scorer(scorer)
    grid_size = len(chosen) * len(specs) * settings.n_alphas
    budget = budget_evals if budget_evals is not None else max(1, math.ceil(grid_size / 4))
    name = method if isinstance(method, str) else getattr(method, "__name__", type(method).__name__)
    return _Inputs(chosen, specs, budget, fn, info["name"] or "logodds", name)


def _objective(ev: Evaluator, norms: dict[int, float], kl_budget: float, st: Settings) -> search.Evaluate:
    """The search's evaluate function: alpha from the dose, KL once, the effect chunk by chunk."""
    chunks = [c for c in np.array_split(np.arange(len(ev.pairs)), min(st.rungs, len(ev.pairs))) if len(c)]
    vnorm = ev.vector.norms()

    def run(cfg: search.Config, number: int) -> Generator[Trial, None, None]:
        alpha = cfg.scale * norms[cfg.layer] / max(vnorm[cfg.layer], 1e-12)
        kl = float(np.quantile(np.concatenate(ev.kl(cfg.layer, alpha, cfg.positions)), st.kl_quantile))
        done: list[np.ndarray] = []
        for k, idx in enumerate(chunks, 1):
            done.append(ev.effect(cfg.layer, alpha, cfg.positions, [int(i) for i in idx]))
            effect = float(np.mean(np.concatenate(done)))
            objective, penalty = penalized(effect, kl, kl_budget, st.kl_penalty)
            yield Trial(number, cfg.layer, cfg.positions, cfg.scale, alpha, effect, kl, penalty, objective,
                        "complete" if k == len(chunks) else "partial", sum(len(d) for d in done) / len(ev.pairs))
    return run


def alpha_range(rec: SearchRecord, kl_budget: float) -> tuple[float, float]:
    """The best trial's alpha and the alphas at its layer and positions within 10 % of its objective and within
    the budget (the best alpha is always inside: a penalised best over the budget once fell outside its range)."""
    b = rec.best
    near = [t.alpha for t in rec.trials if t.state == "complete" and t.layer == b.layer
            and search.label(t.positions) == search.label(b.positions) and t.kl_worst5 <= kl_budget
            and t.objective >= b.objective - 0.1 * abs(b.objective)]
    near = [*near, b.alpha]
    return min(near), max(near)


def _extract(run: Run | MemoryRun, lm: LM, positive: Sequence[Any], negative: Sequence[Any], sp: Split,
             method: str | Aggregator, layers: list[int], st: Settings, show: bool) -> SteeringVector:
    """The vector extracted on the train split at every searched layer (a run artefact when there is a folder)."""
    def make() -> SteeringVector:
        return extract(lm, [positive[i] for i in sp.train], [negative[i] for i in sp.train], method=method,
                       layers=layers, positions=st.extract_positions, batch_size=st.batch_size, show_progress=show)
    return run.vector_step("extract", make)


def _measure(lm: LM, vector: SteeringVector, pairs: list[Pair], neutral: list[str], inp: _Inputs, best: Trial,
             st: Settings, seed: int) -> TestFigure:
    """The chosen configuration, once, on the test split."""
    ev = Evaluator(lm, vector, pairs, neutral, inp.scorer, st)
    effect = ev.effect(best.layer, best.alpha, best.positions, list(range(len(pairs))))
    kl = ev.kl(best.layer, best.alpha, best.positions)
    return TestFigure(intervals.mean(effect, st.n_boot, seed), intervals.pooled_quantile(kl, st.kl_quantile,
                                                                                         st.n_boot, seed),
                      best.effect, LOGODDS if inp.scorer is None else f"{inp.scorer_name} score (steered - unsteered)")


def tuned_vector(vector: SteeringVector, rec: Recommended, test: TestFigure, data_hash: str) -> SteeringVector:
    """The chosen layer of ``vector`` with the recommendation and the test figure in its ``use`` record."""
    use = Use(operation="add", site=vector.site, layers=[rec.layer], positions=rec.positions, alpha=rec.alpha,
              alpha_range=rec.alpha_range, kl_budget=rec.kl_budget, kl_worst5=test.kl_worst5.value,
              effect=test.effect.value, effect_ci95=test.effect.ci95, effect_n=test.effect.n,
              effect_metric=test.metric, tuned_on=data_hash)
    prov = replace(vector.provenance, args={**vector.provenance.args, "tuned_scale": rec.scale}, use=use)
    return SteeringVector({rec.layer: vector[rec.layer]}, vector.site, prov)


def run_config(model: str, positive: Sequence[Any], negative: Sequence[Any], method: str, scorer: str,
               layers: list[int] | None, positions: Sequence[Spec], kl_budget: float, budget: int | None,
               exhaustive: bool, seed: int, settings: Settings) -> dict[str, Any]:
    """What a tune folder's ``config.json`` holds; ``layers`` / ``budget`` None where not known yet (before
    the model loads: the command line checks an existing ``--out`` with the known part).

    Example:
        >>> run_config("smollm2-135m", pos, neg, "dim", "logodds", None, ["all"], 1.0, None, False, 0, Settings())
    """
    specs = [p if isinstance(p, str) else list(p) for p in map(check_positions, positions)]
    return {"model": model, "data": dataset_hash(list(positive) + ["|"] + list(negative)), "method": method,
            "scorer": scorer, "layers": layers, "positions": specs, "kl_budget": kl_budget, "budget": budget,
            "exhaustive": exhaustive, "seed": seed, "settings": settings.to_dict()}


def tune(lm: LM, positive: Sequence[Any], negative: Sequence[Any], method: str | Aggregator = "dim",
         scorer: str | ScoreFn | None = None, layers: Sequence[int] | None = None,
         positions: Sequence[Spec] = ("all", "prompt"), kl_budget: float = 1.0, budget_evals: int | None = None,
         exhaustive: bool = False, seed: int = 0, out: str | Path | None = None, force: bool = False,
         settings: Settings | None = None, show_progress: bool = False) -> TuneResult:
    """Pick layer, alpha and positions for a contrast set on held-out data (docs/tune.md).

    Args:
        lm: the model. positive, negative: contrast examples as for :func:`steerscope.extract`, paired by index.
        method: extraction method name or aggregator (passed to ``extract``).
        scorer: None (teacher-forced log-odds), a name of ``explain.scorers`` or a callable texts -> scores.
        layers: candidate layers (default :func:`default_layers`). positions: candidate steering scopes.
        kl_budget: nats allowed to the worst-5 % neutral KL before the penalty. budget_evals: TPE trials
            (default: a quarter of the grid). exhaustive: score the whole grid instead.
        seed: the split, the sampler and the bootstrap. out: a folder (resumable; writes vector.safetensors,
            tune.json, report.html). settings: :class:`Settings`.

    Returns:
        :class:`TuneResult`.

    Example:
        >>> res = tune(lm, formal, casual, layers=[8, 12, 16], out="runs/tune")
        >>> res.recommended.alpha, res.test.effect  # Estimate(value=..., ci95=(lo, hi), n=15)
    """
    st = settings or Settings()
    inp = check(lm, method, scorer, layers, positions, kl_budget, budget_evals, st)
    pairs, _ = pairs_of(list(positive), list(negative))
    config = run_config(lm.name, positive, negative, inp.method_name, inp.scorer_name, inp.layers, inp.positions,
                        kl_budget, inp.budget, exhaustive, seed, st)
    data = config["data"]
    run: Run | MemoryRun = Run(out, config=config, force=force) if out is not None else MemoryRun()
    try:
        return _steps(run, lm, positive, negative, pairs, method, inp, kl_budget, exhaustive, seed, st, data,
                      show_progress)
    finally:
        run.close()


def _steps(run: Run | MemoryRun, lm: LM, positive: Sequence[Any], negative: Sequence[Any], pairs: list[Pair],
           method: str | Aggregator, inp: _Inputs, kl_budget: float, exhaustive: bool, seed: int, st: Settings,
           data: str, show_progress: bool) -> TuneResult:
    """The run's steps: split, extract, search, test; then the files."""
    dropped = len(positive) + len(negative) - 2 * len(pairs)
    shared = all(p.prompt is not None for p in pairs)
    neutral = neutral_prompts(st.n_neutral)
    sp = run.record("split", Split, lambda: split(len(pairs), len(neutral), seed, st.fractions, shared, dropped))
    vector = _extract(run, lm, positive, negative, sp, method, inp.layers, st, show_progress)
    rec = run.record("search", SearchRecord, lambda: _search(lm, vector, [pairs[i] for i in sp.validation],
                                                             [neutral[i] for i in sp.neutral_validation], inp,
                                                             kl_budget, exhaustive, seed, st, show_progress))
    best = rec.best
    test = run.record("test", TestFigure, lambda: _measure(lm, vector, [pairs[i] for i in sp.test],
                                                          [neutral[i] for i in sp.neutral_test], inp, best, st, seed))
    chosen = Recommended(best.layer, best.alpha, best.positions, vector.site, kl_budget, best.scale,
                         alpha_range(rec, kl_budget))
    result = TuneResult(None, chosen, test, rec, sp.sizes(), seed, lm.name, inp.method_name, inp.scorer_name, data,
                        vector=tuned_vector(vector, chosen, test, data))
    return result if run.folder is None else _write(run.folder, result)


def _search(lm: LM, vector: SteeringVector, pairs: list[Pair], neutral: list[str], inp: _Inputs, kl_budget: float,
            exhaustive: bool, seed: int, st: Settings, show: bool) -> SearchRecord:
    ev = Evaluator(lm, vector, pairs, neutral, inp.scorer, st)
    norms = mean_resid_norms(lm, neutral, inp.layers, vector.site, st.batch_size)
    evaluate = _objective(ev, norms, kl_budget, st)
    what = (f"mean {LOGODDS if inp.scorer is None else inp.scorer_name + ' effect'} - {st.kl_penalty:g} * "
            f"max(0, KL q{st.kl_quantile:g} - {kl_budget:g})")
    if exhaustive:
        return search.exhaustive(evaluate, inp.layers, inp.positions, st, what, show)
    return search.tpe(evaluate, inp.layers, inp.positions, st, inp.budget, seed, what, show)


def _write(folder: Path, result: TuneResult) -> TuneResult:
    """Save the tuned vector, ``tune.json`` and ``report.html`` in the run folder."""
    from steerscope.tune.report import write_report

    assert result.vector is not None
    path = result.vector.save(folder / "vector.safetensors")
    result = replace(result, vector_path=str(path), report_path=str(folder / "report.html"))
    write_json(folder / "tune.json", result.to_dict())
    write_report(result, folder / "report.html")
    return result
