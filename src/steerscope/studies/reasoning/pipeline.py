"""``steerscope study reasoning``: RL-trained steering vectors on a verifiable task, and what they do.

Steps (each resumable; training steps also resume from their last checkpoint):
data → eval_base → train_L<l> / train_all → eval_<name> → sae → train/eval_L<l>_seed<s> →
train_B_L<l> / transfer_* → train/eval_L<l>_gated / gate_values (extras.py) → lens → first_token →
prefix → patching → persistence → pairs → control_random → report.html → lora → report.html
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from steerscope.errors import StudyError
from steerscope.models.load import load_model
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import Config, ReasoningConfig
from steerscope.studies.reasoning.extras import run_extras
from steerscope.studies.reasoning.family import family
from steerscope.studies.reasoning.report import write_report as write_html


def run_study(cfg: ReasoningConfig, out: str | Path, device: str = "cpu", force: bool = False,
              report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return the summary (with the report path).

    With ``report_only``, unfinished steps are skipped and the report shows what has finished.
    """
    t0 = time.time()
    run = Run(out, config=cfg.identity(), force=force)
    if report_only:
        _only_finished_steps(run)
    lm = load_model(cfg.model, device=device)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    singles = cfg.resolve_layers(lm.n_layers)
    train, test = st.problems(cfg)
    run.step("data", lambda: {"train": [p.to_dict() for p in train], "test": [p.to_dict() for p in test]})
    evals = {"base": run.step("eval_base", lambda: st.evaluate(lm, test, cfg, "base"))}
    if evals["base"] is None:
        raise StudyError(f"{run.folder} has no finished evaluation yet; run without --report-only first")
    trained = _train_vectors(run, lm, cfg, singles, test, evals)
    evals = {n: e for n, e in evals.items() if e is not None}
    vecs = {n: st.load_vector(run, n) for n in trained}
    res: dict[str, Any] = run_extras(run, lm, cfg, vecs, evals, test, device)  # SAE, seeds, transfer, gate
    _mechanism_steps(run, lm, cfg, singles, test, vecs, evals, res)
    res = {k: v for k, v in res.items() if v is not None}
    report = _finish(run, cfg, lm, evals, trained, res, t0)
    if cfg.lora and (not report_only or run.done("lora")):  # last, so that a run cut short still has a report with everything else
        lora = run.step("lora", lambda: st.train_and_eval_lora(run, cfg, device))
        trained["lora"] = lora
        evals["lora"] = lora["eval"]
        report = _finish(run, cfg, lm, evals, trained, res, t0)
    return report


def _only_finished_steps(run: Run) -> None:
    """Make ``run.step`` return a finished step's record and ``None`` for any other, computing nothing."""
    def step(name: str, fn: Any) -> Any:
        return run.load(name) if run.done(name) else None

    run.step = step  # type: ignore[method-assign]


def _train_vectors(run: Run, lm: Any, cfg: ReasoningConfig, singles: list[int], test: list[Any],
                   evals: dict[str, Any]) -> dict[str, Any]:
    """Train one vector per single layer (and one over all layers with ``train_all``) and evaluate each.

    Returns the training records by vector name (``L<l>``, ``all``); each vector's evaluation goes into ``evals``.
    """
    names = [f"L{x}" for x in singles] + (["all"] if cfg.train_all else [])
    trained: dict[str, Any] = {}
    for name, x in zip(names, [[x] for x in singles] + (["all"] if cfg.train_all else [])):
        t = run.step(f"train_{name}", partial(st.train_vector, run, lm, cfg, name, x))
        if t is None:
            continue
        trained[name] = t
        vec = st.load_vector(run, name)
        evals[name] = run.step(f"eval_{name}", partial(st.evaluate, lm, test, cfg, name, vec))
    return trained


def _mechanism_steps(run: Run, lm: Any, cfg: ReasoningConfig, singles: list[int], test: list[Any],
                     vecs: dict[str, Any], evals: dict[str, Any], res: dict[str, Any]) -> None:
    """What the trained vectors do, one step each, in this order: logit lens; first-token change and the
    prefix control (last-layer vector); q/k/v patching (penultimate); persistence; layer pairs; a random
    control (penultimate). Records go into ``res``, the evaluations they make into ``evals``."""
    run.step("lens", lambda: st.lens_step(lm, vecs))
    last, pen = lm.n_layers - 1, lm.n_layers - 2
    if f"L{last}" in vecs:
        v_last = vecs[f"L{last}"]
        texts = [lm.format_chat(p.prompt, cfg.system) for p in test[: cfg.n_analysis]]
        res["first_token"] = run.step("first_token", lambda: an.first_token_delta(lm, v_last, texts))
    res["prefix"] = _prefix_steps(run, lm, cfg, singles, test, vecs, evals)
    if f"L{pen}" in vecs:
        v_pen = vecs[f"L{pen}"]
        res["patching"] = run.step("patching", lambda: {"layer": pen, "rows": an.qkv_patching(
            lm, v_pen, *st.analysis_texts(lm, cfg, v_pen)[:2])})
    res["persistence"] = run.step("persistence", partial(_persistence, lm, cfg, vecs, singles))
    acc = {n: e["greedy_acc"] for n, e in evals.items()}
    if len(singles) >= 2 and all(f"L{x}" in vecs for x in singles):
        res["pairs"] = run.step("pairs", lambda: st.pairs_step(lm, run, cfg, singles, acc))
    if f"L{pen}" in vecs:  # control: a random direction of the same norm at the same layer
        res["control"] = run.step("control_random", lambda: st.random_control(lm, cfg, vecs[f"L{pen}"], pen))
        if res["control"] is not None:
            evals[f"random L{pen}"] = res["control"]["eval"]


def _prefix_eval(lm: Any, cfg: ReasoningConfig, test: list[Any], name: str, token: str) -> dict[str, Any]:
    return {"token": token, "vector": name, "eval": st.evaluate(lm, test, cfg, f"prefix {token!r} ({name})", prefix=token)}


def _prefix_steps(run: Run, lm: Any, cfg: ReasoningConfig, singles: list[int], test: list[Any],
                  vecs: dict[str, Any], evals: dict[str, Any]) -> dict[str, Any] | None:
    """Prefix control per single-layer vector (step ``prefix_L<l>``): the vector's OWN top logit-lens token
    (no final norm) written at the start of the response instead of steering, compared with that vector's
    gain over base (:func:`analyses.prefix_summary`). Each evaluation goes into ``evals`` as ``prefix L<l>``."""
    from steerscope.analyses.lens import logit_lens

    rows = []
    for x in singles:
        name = f"L{x}"
        if name not in vecs or evals.get(name) is None:
            continue
        top = logit_lens(lm, vecs[name][x][None].to(lm.device), k=1)[0].tokens[0]
        ev = run.step(f"prefix_{name}", partial(_prefix_eval, lm, cfg, test, name, top))
        if ev is None:
            continue
        evals[f"prefix {name}"] = ev["eval"]
        rows.append(an.prefix_summary(top, x, evals["base"], evals[name], ev["eval"]))
    return {"rows": rows} if rows else None


def _persistence(lm: Any, cfg: ReasoningConfig, vecs: dict[str, Any], singles: list[int]) -> dict[str, Any]:
    """How the per-token residual change of each single-layer vector persists through the later layers."""
    rows = []
    for x in singles:
        texts, comps, _ = st.analysis_texts(lm, cfg, vecs[f"L{x}"])
        rows.append({"vector": f"L{x}", "rows": an.persistence(lm, vecs[f"L{x}"], x, texts, comps)})
    return {"vectors": rows}


def _finish(run: Run, cfg: ReasoningConfig, lm: Any, evals: dict[str, Any], trained: dict[str, Any],
            res: dict[str, Any], t0: float) -> dict[str, Any]:
    """Summary dict and report.html from what has run so far."""
    summary = {
        "accuracy": {n: {"greedy": e["greedy_acc"], "greedy_ci": e["greedy_ci"], "sampled": e["sampled_acc"],
                         "sampled_ci": e["sampled_ci"], "n": e["n"], "k": e.get("k")} for n, e in evals.items()},
        "mcnemar_p_vs_base": {n: mcnemar_p(evals["base"]["greedy"], e["greedy"]) for n, e in evals.items()
                              if n != "base"},
        "paired_vs_base": {n: {"greedy": paired_diff(evals["base"]["greedy"], e["greedy"]),
                               "greedy_changed": an.changed_answers(evals["base"]["greedy"], e["greedy"]),
                               "sampled": an.sampled_comparison(evals["base"], e)}
                           for n, e in evals.items() if n != "base"},
        "family": family(evals, res),
        "n_trainable": {n: t["n_trainable"] for n, t in trained.items()},
        "seconds": round(time.time() - t0, 1),
    }
    report = write_html(run, cfg, lm, evals, trained, res, summary)
    summary["report"] = str(report)
    summary["run"] = str(run.folder)
    return summary


def run(cfg: Config, out: Path, device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return the summary (report path under ``"report"``).

    Example:
        >>> run(preset("tiny"), Path("runs/reasoning"))["accuracy"]["base"]
    """
    return run_study(cfg, out, device=device, force=force)


def write_report(out: Path) -> Path:
    """Rewrite ``out/report.html`` from the finished steps, running none (the model is loaded on the CPU)."""
    return Path(run_study(Config.load(out), out, report_only=True)["report"])
