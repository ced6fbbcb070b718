"""``steerscope study reasoning``: RL-trained steering vectors on a verifiable task, and what they do.

Steps (each resumable; training steps also resume from their last checkpoint):
data → eval_base → train_L<l> / train_all → eval_<name> → sae → train/eval_L<l>_seed<s> →
train_B_L<l> / transfer_* → train/eval_L<l>_gated / gate_values (extras.py) → lens → first_token →
prefix → patching → persistence → pairs → control_random → report.html → lora → report.html
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from steerscope.errors import StudyError
from steerscope.models.load import load_model
from steerscope.steer import steering
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import PRESETS, ReasoningConfig, preset
from steerscope.studies.reasoning.extras import run_extras
from steerscope.studies.reasoning.report import write_report
from steerscope.studies.runner import Run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="configuration preset (docs/reasoning.md)")
    p.add_argument("--layers", default=None, help="single layers to train, e.g. mid,-2,-1")
    p.add_argument("--steps", type=int, default=None, help="RLOO steps per trained vector")
    p.add_argument("--k", type=int, default=None, help="samples per prompt")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--difficulty", default=None)
    p.add_argument("--no-all", action="store_true", help="skip the all-layers vector")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA baseline")
    p.add_argument("--gate", action="store_true", help="adaptive per-token scaling of the bias")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from finished steps; run nothing")
    p.add_argument("--transfer-model", default=None, help="a model of the same depth and width to transfer to")
    p.add_argument("--no-transfer", action="store_true", help="skip the transfer step")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the penultimate-layer headline vector")
    p.add_argument("--no-gate-compare", action="store_true", help="skip the gated vs plain comparison")
    p.add_argument("--no-sae", action="store_true", help="skip the SAE / DiffSAE step")


def config_from_args(a: argparse.Namespace) -> ReasoningConfig:
    model = a.model if a.model != "smollm2-135m" or a.preset == "cpu" else None
    cfg = preset(a.preset, model=model, layers=tuple(a.layers.split(",")) if a.layers else None, steps=a.steps,
                 k=a.k, prompts_per_step=a.prompts_per_step, lr=a.lr, n_test=a.n_test, difficulty=a.difficulty,
                 transfer_model=a.transfer_model, seed=a.seed, seeds=a.seeds)
    from dataclasses import replace

    return replace(cfg, train_all=cfg.train_all and not a.no_all, lora=cfg.lora and not a.no_lora,
                   gate=cfg.gate or a.gate, gate_compare=cfg.gate_compare and not a.no_gate_compare,
                   sae=cfg.sae and not a.no_sae, transfer_model=None if a.no_transfer else cfg.transfer_model)


def run_study(cfg: ReasoningConfig, out: str | Path, device: str = "cpu", force: bool = False,
              report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the study in ``out``; return the summary (with the report path).

    With ``report_only``, unfinished steps are skipped and the report shows what has finished.
    """
    t0 = time.time()
    run = Run(out, config=cfg.to_dict(), force=force)
    if report_only:
        def step(name: str, fn: Any) -> Any:
            return run.load(name) if run.done(name) else None

        run.step = step  # type: ignore[method-assign]
    lm = load_model(cfg.model, device=device)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    singles = cfg.resolve_layers(lm.n_layers)
    train, test = st.problems(cfg)
    run.step("data", lambda: {"train": [p.to_dict() for p in train], "test": [p.to_dict() for p in test]})
    evals = {"base": run.step("eval_base", lambda: st.evaluate(lm, test, cfg, "base"))}
    if evals["base"] is None:
        raise StudyError(f"{run.folder} has no finished evaluation yet; run without --report-only first")
    names = [f"L{x}" for x in singles] + (["all"] if cfg.train_all else [])
    trained = {}
    for name, x in zip(names, [[x] for x in singles] + (["all"] if cfg.train_all else [])):
        t = run.step(f"train_{name}", lambda name=name, x=x: st.train_vector(run, lm, cfg, name, x))
        if t is None:
            continue
        trained[name] = t
        vec = st.load_vector(run, name)
        evals[name] = run.step(f"eval_{name}", lambda name=name, vec=vec: st.evaluate(
            lm, test, cfg, name, lambda: steering(lm, vec, 1.0)))
    evals = {n: e for n, e in evals.items() if e is not None}
    vecs = {n: st.load_vector(run, n) for n in trained}
    res: dict[str, Any] = run_extras(run, lm, cfg, vecs, evals, test, device)  # SAE, seeds, transfer, gate
    run.step("lens", lambda: st.lens_step(lm, vecs))
    last, pen = lm.n_layers - 1, lm.n_layers - 2
    if f"L{last}" in vecs:
        v_last = vecs[f"L{last}"]
        texts = [lm.format_chat(p.prompt, cfg.system) for p in test[: cfg.n_analysis]]
        res["first_token"] = run.step("first_token", lambda: an.first_token_delta(lm, v_last, texts))
        from steerscope.lens import logit_lens

        top = logit_lens(lm, v_last[last][None].to(lm.device), k=1)[0].tokens[0]
        res["prefix"] = run.step("prefix", lambda: {"token": top, "eval": st.evaluate(lm, test, cfg, f"prefix {top!r}",
                                                                                         prefix=top)})
        if res["prefix"] is not None:
            evals["prefix"] = res["prefix"]["eval"]
    if f"L{pen}" in vecs:
        v_pen = vecs[f"L{pen}"]
        res["patching"] = run.step("patching", lambda: {"layer": pen, "rows": an.qkv_patching(
            lm, v_pen, *st.analysis_texts(lm, cfg, v_pen)[:2])})
    def _persist() -> dict:
        rows = []
        for x in singles:
            texts, comps, _ = st.analysis_texts(lm, cfg, vecs[f"L{x}"])
            rows.append({"vector": f"L{x}", "rows": an.persistence(lm, vecs[f"L{x}"], x, texts, comps)})
        return {"vectors": rows}
    res["persistence"] = run.step("persistence", _persist)
    acc = {n: e["greedy_acc"] for n, e in evals.items()}
    if len(singles) >= 2 and all(f"L{x}" in vecs for x in singles):
        res["pairs"] = run.step("pairs", lambda: st.pairs_step(lm, run, cfg, singles, acc))
    if f"L{pen}" in vecs:  # control: a random direction of the same norm at the same layer
        res["control"] = run.step("control_random", lambda: st.random_control(lm, cfg, vecs[f"L{pen}"], pen))
        if res["control"] is not None:
            evals[f"random L{pen}"] = res["control"]["eval"]
    res = {k: v for k, v in res.items() if v is not None}
    report = _finish(run, cfg, lm, evals, trained, res, t0)
    if cfg.lora and (not report_only or run.done("lora")):  # last, so that a run cut short still has a report with everything else
        lora = run.step("lora", lambda: st.train_and_eval_lora(run, cfg, device))
        trained["lora"] = lora
        evals["lora"] = lora["eval"]
        report = _finish(run, cfg, lm, evals, trained, res, t0)
    return report


def _finish(run: Run, cfg: ReasoningConfig, lm: Any, evals: dict, trained: dict, res: dict, t0: float) -> dict:
    """Summary dict and report.html from what has run so far."""
    summary = {
        "accuracy": {n: {"greedy": e["greedy_acc"], "greedy_ci": e["greedy_ci"], "sampled": e["sampled_acc"],
                         "sampled_ci": e["sampled_ci"]} for n, e in evals.items()},
        "mcnemar_p_vs_base": {n: an.mcnemar_p(evals["base"]["greedy"], e["greedy"]) for n, e in evals.items()
                              if n != "base"},
        "paired_vs_base": {n: {"greedy": an.paired_diff(evals["base"]["greedy"], e["greedy"]),
                               "sampled": an.paired_diff(evals["base"]["sampled"], e["sampled"])
                               if e["sampled"] else None} for n, e in evals.items() if n != "base"},
        "n_trainable": {n: t["n_trainable"] for n, t in trained.items()},
        "seconds": round(time.time() - t0, 1),
    }
    report = write_report(run, cfg, lm, evals, trained, res, summary)
    summary["report"] = str(report)
    summary["run"] = str(run.folder)
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    cfg = config_from_args(args)
    return run_study(cfg, args.out, device=args.device, force=args.force, report_only=args.report_only)
