"""``steerscope study refusal-mechanisms``: why refusal steering works, end to end and resumable.

Steps (each cached as ``steps/<name>.json`` in ``--out``): attribution (EAP-IG) per vector and
setting, the EAP-IG vs exact patching check, circuits + faithfulness, circuit comparison,
frozen-attention ablations, svv logit lens, sparsification, IoU; then the HTML report.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch

from steerscope.errors import StudyError
from steerscope.studies.refusal_mechanisms import steps as St
from steerscope.studies.refusal_mechanisms.config import PRESETS, Config, parse_vectors, vectors_from_dir
from steerscope.studies.runner import Run


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Study options (the common --model/--device/--json/--out/--seed/--force come from the CLI)."""
    p.set_defaults(model="smollm2-135m-safe")
    p.add_argument("--vectors", default=None, help="name=path pairs, e.g. dim=a.safetensors,po=b.safetensors "
                   "(default: the shipped smollm2-135m-safe/refusal-{dim,ntp,po})")
    p.add_argument("--vector-dir", default=None, help="a refusal run folder: use its dim/ntp/po *.safetensors")
    p.add_argument("--alpha-bypass", type=float, default=-1.0)
    p.add_argument("--alpha-induce", type=float, default=1.0)
    p.add_argument("--n-eval", type=int, default=32, help="prompts per ASR measurement")
    p.add_argument("--eval-tokens", type=int, default=32)
    p.add_argument("--n-attr", type=int, default=8, help="prompts per attribution set")
    p.add_argument("--attr-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=10, help="IG midpoint steps T")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named configuration (docs/refusal-mechanisms.md); explicit options override it")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")


def config_from(args: argparse.Namespace) -> Config:
    if args.vectors and args.vector_dir:
        raise StudyError("give --vectors or --vector-dir, not both")
    given = dict(model=args.model, alpha_bypass=args.alpha_bypass, alpha_induce=args.alpha_induce,
                 n_eval=args.n_eval, eval_tokens=args.eval_tokens, n_attr=args.n_attr, attr_tokens=args.attr_tokens,
                 steps=args.steps, seed=args.seed, dtype=getattr(args, "dtype", "float32"))
    preset = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    d = Config().to_dict()
    cfg = Config(**(preset | {k: v for k, v in given.items() if k not in preset or v != d[k]}))
    if args.vectors:
        cfg = replace(cfg, vectors=parse_vectors(args.vectors))
    elif args.vector_dir:
        cfg = replace(cfg, vectors=vectors_from_dir(args.vector_dir))
    if args.quick:
        cfg = replace(cfg, n_eval=4, eval_tokens=8, n_attr=3, attr_tokens=6, steps=2, n_check=2,
                      sparsities=(0.5, 0.9), circuit_fracs=(0.05, 0.3, 1.0))
    if cfg.alpha_bypass >= 0 or cfg.alpha_induce <= 0:
        raise StudyError("use --alpha-bypass < 0 (subtract s on harmful prompts) and --alpha-induce > 0")
    return cfg


def load_vectors(lm: Any, cfg: Config) -> dict[str, Any]:
    from steerscope.vector import SteeringVector

    vecs = {}
    for name, src in cfg.vectors.items():
        v = SteeringVector.load(src)
        v.check_compatible(lm)
        vecs[name] = v.select([v.layers[0]]) if len(v) > 1 else v
    return vecs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the study; return a summary with the report path under ``"report"``."""
    import steerscope as ss
    from steerscope.studies.refusal_mechanisms.report import write_report

    cfg = config_from(args)
    torch.manual_seed(cfg.seed)
    run_ = Run(args.out, config=cfg.to_dict(), force=args.force)
    lm = ss.load_model(cfg.model, device=args.device, dtype=cfg.dtype)
    vecs = load_vectors(lm, cfg)
    names = list(vecs)
    for n in names:
        for setting in St.SETTINGS:
            run_.step(f"attribution_{n}_{setting}", lambda n=n, s=setting: St.step_attribution(
                run_, lm, cfg, n, vecs[n], s))
    run_.step("exact_check", lambda: St.step_exact_check(run_, lm, cfg, vecs["dim"]))
    for n in names:
        for setting in St.SETTINGS:
            run_.step(f"circuits_{n}_{setting}", lambda n=n, s=setting: St.step_circuits(run_, lm, cfg, n, vecs[n], s))
    for setting in St.SETTINGS:
        run_.step(f"circuit_compare_{setting}", lambda s=setting: St.step_circuit_compare(run_, lm, cfg, vecs, s))
        run_.step(f"ablations_{setting}", lambda s=setting: St.step_ablations(run_, lm, cfg, vecs["dim"], s))
    for n in names:
        run_.step(f"svv_{n}", lambda n=n: St.step_svv(run_, lm, cfg, n, vecs[n]))
        run_.step(f"sparsity_{n}_bypass", lambda n=n: St.step_sparsity(run_, lm, cfg, n, vecs[n]))
    run_.step("iou_bypass", lambda: St.step_iou(run_, lm, cfg, names))
    report = write_report(run_, cfg, names)
    return {"report": str(report), "out": str(run_.folder), "summary": summary(run_, names), "log": run_.log}


def summary(run_: Run, names: list[str]) -> dict[str, Any]:
    """The headline numbers (the paper A findings to check)."""
    out: dict[str, Any] = {}
    for setting in St.SETTINGS:
        if run_.done(f"ablations_{setting}"):
            a = run_.load(f"ablations_{setting}")
            out[f"asr_{setting}"] = {k: a[k] for k in ("unsteered", "none", "qk", "ov", "svv", "mlp")}
        if run_.done(f"circuit_compare_{setting}"):
            out[f"overlap_{setting}"] = run_.load(f"circuit_compare_{setting}")["overlap"]
        for n in names:
            if run_.done(f"circuits_{n}_{setting}"):
                c = run_.load(f"circuits_{n}_{setting}")
                out[f"minimal_circuit_{n}_{setting}"] = {"edges": c["minimal_edges"], "of": c["n_edges_total"],
                                                         "reached": c["reached_threshold"]}
    if run_.done("exact_check"):
        out["eapig_vs_exact"] = {k: v for k, v in run_.load("exact_check").items() if k.startswith(("spearman", "time"))}
    for n in names:
        if run_.done(f"sparsity_{n}_bypass"):
            sp = run_.load(f"sparsity_{n}_bypass")
            if sp["asr"]:
                out[f"sparsity_{n}_bypass"] = {"sparsities": sp["sparsities"], "dense": sp.get("dense_asr"), **sp["asr"]}
    return out
