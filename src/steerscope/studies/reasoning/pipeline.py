"""``steerscope study reasoning``: RL-trained steering vectors on a verifiable task, and what they do.

Steps (each resumable; training steps also resume from their last checkpoint):
data → eval_base → train_L<l> / train_all → eval_<name> → sae → train/eval_L<l>_seed<s> →
train_B_L<l> / transfer_* → train/eval_L<l>_gated / gate_values (extras.py) → lens → first_token →
prefix → patching → persistence → pairs → control_random → report.html → lora → report.html
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

from steerscope.analyses.records import Record
from steerscope.errors import StudyError
from steerscope.models.load import LM, load_model
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import Config, ReasoningConfig
from steerscope.studies.reasoning.extras import run_extras
from steerscope.studies.reasoning.family import family
from steerscope.studies.reasoning.records import EvalRecord, Findings, LoraRecord, Summary, TrainRecord
from steerscope.studies.reasoning.report import write_report as write_html
from steerscope.studies.reasoning.task import Problem
from steerscope.vector import SteeringVector

R = TypeVar("R", bound=Record)
Trained = dict[str, TrainRecord | LoraRecord]  # the training records by vector name (``lora`` for the baseline)


def run_study(cfg: ReasoningConfig, out: str | Path, device: str = "cpu", force: bool = False,
              report_only: bool = False) -> Summary:
    """Run (or resume) the study in ``out``; return the summary (with the report path).

    With ``report_only``, unfinished steps are skipped and the report shows what has finished.

    Example:
        >>> run_study(preset("tiny"), "runs/reasoning").accuracy["base"].greedy
    """
    t0 = time.time()
    run = Run(out, config=cfg.identity(), force=force)
    if report_only:
        _only_finished_steps(run)
    lm = load_model(cfg.model, device=device, dtype=cfg.dtype)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    singles = cfg.resolve_layers(lm.n_layers)
    cfg.resolve_pair_layers(lm.n_layers)  # a bad --pair-layers fails here, not after hours of training
    train, test = st.problems(cfg)
    run.record(rc.DATA, rc.DataRecord, lambda: rc.DataRecord([p.to_dict() for p in train], [p.to_dict() for p in test]))
    evals = {"base": run.record(rc.EVAL_BASE, EvalRecord, lambda: st.evaluate(lm, test, cfg, "base"))}
    if evals["base"] is None:
        raise StudyError(f"{run.folder} has no finished evaluation yet; run without --report-only first")
    trained = _train_vectors(run, lm, cfg, singles, test, evals)
    evals = {n: e for n, e in evals.items() if e is not None}
    vecs = {n: st.load_vector(run, n) for n in trained}
    res = run_extras(run, lm, cfg, vecs, evals, test, device)  # SAE, seeds, transfer, gate
    res = _mechanism_steps(run, lm, cfg, singles, test, vecs, evals, res)
    summary = _finish(run, cfg, lm, evals, trained, res, t0)
    if cfg.lora and (not report_only or run.done(rc.LORA)):  # last, so that a run cut short still has a report with everything else
        lora = run.record(rc.LORA, LoraRecord, lambda: st.train_and_eval_lora(run, cfg, device))
        trained["lora"] = lora
        evals["lora"] = lora.eval
        summary = _finish(run, cfg, lm, evals, trained, res, t0)
    return summary


def _only_finished_steps(run: Run) -> None:
    """Make ``run.record`` return a finished step's record and ``None`` for any other, computing nothing."""
    def record(name: str, cls: type[R], fn: Callable[[], R]) -> R | None:
        return run.load_record(name, cls) if run.done(name) else None

    run.record = record  # type: ignore[method-assign,assignment]


def _train_vectors(run: Run, lm: LM, cfg: ReasoningConfig, singles: list[int], test: list[Problem],
                   evals: dict[str, EvalRecord]) -> Trained:
    """Train one vector per single layer (and one over all layers with ``train_all``) and evaluate each.

    Returns the training records by vector name (``L<l>``, ``all``); each vector's evaluation goes into ``evals``.
    """
    layer_sets: list[list[int] | str] = [[x] for x in singles]
    names = [rc.vector_name(x) for x in singles] + (["all"] if cfg.train_all else [])
    trained: Trained = {}
    for name, x in zip(names, layer_sets + (["all"] if cfg.train_all else [])):
        t = run.record(rc.train_step(name), TrainRecord, partial(st.train_vector, run, lm, cfg, name, x))
        if t is None:
            continue
        trained[name] = t
        vec = st.load_vector(run, name)
        evals[name] = run.record(rc.eval_step(name), EvalRecord, partial(st.evaluate, lm, test, cfg, name, vec))
    return trained


def _mechanism_steps(run: Run, lm: LM, cfg: ReasoningConfig, singles: list[int], test: list[Problem],
                     vecs: dict[str, SteeringVector], evals: dict[str, EvalRecord], res: Findings) -> Findings:
    """What the trained vectors do, one step each, in this order: logit lens; first-token change and the
    prefix control (last-layer vector); q/k/v patching (penultimate); persistence; layer pairs; a random
    control (penultimate). Returns ``res`` with their records; the evaluations they make go into ``evals``."""
    run.record(rc.LENS, rc.LensRecord, lambda: st.lens_step(lm, vecs))
    last, pen = rc.vector_name(lm.n_layers - 1), rc.vector_name(lm.n_layers - 2)
    if last in vecs:
        texts = st.chat_texts(lm, cfg, test[: cfg.n_analysis])
        res = replace(res, first_token=run.record(rc.FIRST_TOKEN, rc.FirstTokenRecord,
                                                  lambda: an.first_token_delta(lm, vecs[last], texts)))
    res = replace(res, prefix=_prefix_steps(run, lm, cfg, singles, test, vecs, evals))
    if pen in vecs:
        res = replace(res, patching=run.record(rc.PATCHING, rc.PatchingRecord, lambda: rc.PatchingRecord(
            lm.n_layers - 2, an.qkv_patching(lm, vecs[pen], *st.analysis_texts(lm, cfg, vecs[pen])[:2]))))
    res = replace(res, persistence=run.record(rc.PERSISTENCE, rc.PersistenceRecord,
                                              partial(_persistence, lm, cfg, vecs, singles)))
    acc = {n: e.greedy_acc for n, e in evals.items()}
    paired = cfg.resolve_pair_layers(lm.n_layers)
    if len(paired) >= 2 and all(rc.vector_name(x) in vecs for x in paired):
        res = replace(res, pairs=run.record(rc.PAIRS, rc.PairsRecord, lambda: st.pairs_step(lm, run, cfg, paired, acc)))
    if pen in vecs:  # control: a random direction of the same norm at the same layer
        control = run.record(rc.CONTROL, rc.ControlRecord,
                             lambda: st.random_control(lm, cfg, vecs[pen], lm.n_layers - 2))
        res = replace(res, control=control)
        if control is not None:
            evals[f"random {pen}"] = control.eval
    return res


def _prefix_eval(lm: LM, cfg: ReasoningConfig, test: list[Problem], name: str, token: str) -> rc.PrefixEval:
    return rc.PrefixEval(token, name, st.evaluate(lm, test, cfg, f"prefix {token!r} ({name})", prefix=token))


def _prefix_steps(run: Run, lm: LM, cfg: ReasoningConfig, singles: list[int], test: list[Problem],
                  vecs: dict[str, SteeringVector], evals: dict[str, EvalRecord]) -> rc.PrefixRecord | None:
    """Prefix control per single-layer vector of the last two layers (step ``prefix_L<l>``; paper B's "To"
    analysis is of the last layers' vectors, and a layer sweep would otherwise double its evaluations): the
    vector's OWN top logit-lens token (no final norm) written at the start of the response instead of steering,
    compared with that vector's gain over base (:func:`analyses.prefix_summary`). Each evaluation goes into
    ``evals`` as ``prefix L<l>``."""
    from steerscope.analyses.lens import logit_lens

    rows = []
    for x in [s for s in singles if s >= lm.n_layers - 2]:
        name = rc.vector_name(x)
        if name not in vecs or evals.get(name) is None:
            continue
        top = logit_lens(lm, vecs[name][x][None].to(lm.device), k=1)[0].tokens[0]
        ev = run.record(rc.prefix_step(name), rc.PrefixEval, partial(_prefix_eval, lm, cfg, test, name, top))
        if ev is None:
            continue
        evals[f"prefix {name}"] = ev.eval
        rows.append(an.prefix_summary(top, x, evals["base"], evals[name], ev.eval))
    return rc.PrefixRecord(rows) if rows else None


def _persistence(lm: LM, cfg: ReasoningConfig, vecs: dict[str, SteeringVector], singles: list[int]) -> rc.PersistenceRecord:
    """How the per-token residual change of each single-layer vector persists through the later layers."""
    rows = []
    for x in singles:
        name = rc.vector_name(x)
        texts, comps, _ = st.analysis_texts(lm, cfg, vecs[name])
        rows.append(rc.VectorPersistence(name, an.persistence(lm, vecs[name], x, texts, comps)))
    return rc.PersistenceRecord(rows)


def _finish(run: Run, cfg: ReasoningConfig, lm: LM, evals: dict[str, EvalRecord], trained: Trained,
            res: Findings, t0: float) -> Summary:
    """The summary and report.html from what has run so far."""
    base = evals["base"]
    summary = Summary(
        {n: rc.AccuracyRow(e.greedy_acc, e.greedy_ci, e.sampled_acc, e.sampled_ci, e.n, e.k) for n, e in evals.items()},
        {n: mcnemar_p(base.greedy, e.greedy) for n, e in evals.items() if n != "base"},
        {n: rc.PairedVsBase(paired_diff(base.greedy, e.greedy), an.changed_answers(base.greedy, e.greedy),
                            an.sampled_comparison(base, e)) for n, e in evals.items() if n != "base"},
        family(evals, res), {n: t.n_trainable for n, t in trained.items()}, round(time.time() - t0, 1))
    report = write_html(run, cfg, lm, evals, trained, res, summary)
    return replace(summary, report=str(report), run=str(run.folder))


def run(cfg: Config, out: Path, device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return the summary (report path under ``"report"``).

    Example:
        >>> run(preset("tiny"), Path("runs/reasoning"))["accuracy"]["base"]
    """
    return run_study(cfg, out, device=device, force=force).to_dict()


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the finished steps, running none (the model is loaded on the CPU)."""
    return Path(str(run_study(Config.load(out), out, report_only=True).report))
