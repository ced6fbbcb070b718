"""``steerscope study refusal``: organism, direction selection, DIM / NTP / PO vectors, ASR report."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from steerscope.studies.refusal import steps
from steerscope.studies.refusal.config import PRESETS, RefusalConfig
from steerscope.studies.runner import Run, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RefusalConfig()
    p.set_defaults(model=d.model)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named configuration (docs/refusal.md); explicit options override it")
    p.add_argument("--positions", default=None, help="candidate positions, e.g. -5,-1 (default -5..-1)")
    p.add_argument("--select-alphas", type=float, nargs="+", default=list(d.select_alphas),
                   help="multiples of the DIM vector scored by the selection (the pick scales the vector)")
    p.add_argument("--trained-tokens", type=int, default=d.trained_tokens, help="NTP/PO answer tokens")
    p.add_argument("--matched-norm", action="store_true", help="also evaluate NTP/PO rescaled to |DIM|")
    p.add_argument("--dtype", default=d.dtype, help="model dtype: float32 or bfloat16")
    p.add_argument("--retrain-organism", action="store_true", help="rebuild the LoRA organism (slow)")
    p.add_argument("--shipped-vectors", action="store_true",
                   help="evaluate the shipped organism vectors instead of this run's (skips NTP/PO training)")
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--n-val", type=int, default=d.n_val, help="validation prompts per side for selection")
    p.add_argument("--n-test", type=int, default=d.n_test, help="test prompts per side for the ASR table")
    p.add_argument("--layer-stride", type=int, default=d.layer_stride, help="score every k-th layer (1 = all)")
    p.add_argument("--layers", default=None, help="explicit candidate layers, e.g. 6,8,10 (overrides --layer-stride)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(d.alphas), help="steering magnitudes")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--n-trained", type=int, default=d.n_trained, help="prompts per side for NTP/PO data")
    p.add_argument("--trained-epochs", type=int, default=d.trained_epochs)
    p.add_argument("--trained-lr", type=float, default=d.trained_lr, help="Adam learning rate for NTP / PO")
    p.add_argument("--trained-batch", type=int, default=d.trained_batch)
    p.add_argument("--gen-batch", type=int, default=d.gen_batch, help="prompts per batched generation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def config_from_args(args: argparse.Namespace) -> RefusalConfig:
    """The study configuration: the preset (if any), then every option given on the command line.

    An option left at its default does not override the preset (so giving an option its default
    value explicitly does not either).
    """
    ints = lambda v: tuple(int(x) for x in v.split(",")) if isinstance(v, str) else v
    given = dict(model=args.model, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                 layer_stride=args.layer_stride, layers=ints(args.layers), alphas=tuple(args.alphas),
                 max_new_tokens=args.max_new_tokens, n_trained=args.n_trained, trained_epochs=args.trained_epochs,
                 trained_lr=args.trained_lr, trained_batch=args.trained_batch, gen_batch=args.gen_batch,
                 retrain_organism=args.retrain_organism, shipped_vectors=args.shipped_vectors,
                 positions=ints(getattr(args, "positions", None)),
                 select_alphas=tuple(getattr(args, "select_alphas", (1.0,))),
                 trained_tokens=getattr(args, "trained_tokens", 32), matched_norm=getattr(args, "matched_norm", False),
                 dtype=getattr(args, "dtype", "float32"))
    d = RefusalConfig().to_json()
    preset = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    kw: dict[str, Any] = dict(preset)
    for k, v in given.items():
        if v is not None and (k not in preset or _differs(v, d[k])):
            kw[k] = v
    return RefusalConfig(**kw)


def _differs(v: Any, default: Any) -> bool:
    norm = lambda x: list(x) if isinstance(x, (tuple, list)) else x
    return bool(norm(v) != norm(default))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = config_from_args(args)
    r = Run(args.out, config=cfg.to_json(), force=args.force)
    organism = r.step("organism", lambda: steps.organism_step(cfg, r))
    lm = steps.load_study_model(cfg, r, device=args.device)
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
    results = {"config": cfg.to_json(), "organism": organism, "select": sel, "trained": trained, "evaluate": ev,
               "cosines": steps.cosines(vectors),
               "vector_source": "shipped" if steps.use_shipped(cfg) else "this run",
               "shipped_pick_matches": {"layer": layer, "position": dim.provenance.positions,
                                        "recomputed": [sel["layer"], sel["position"]]}}
    write_json(r.folder / "results.json", results)
    from steerscope.studies.refusal.report import write_report

    report = write_report(r.folder, results)
    summary = {"report": str(report), "results": str(r.folder / "results.json"), "layer": layer,
               "unsteered": {k: v for k, v in ev["unsteered"].items() if k != "samples"},
               "steered": [{k: v for k, v in s.items() if k != "samples"} for s in ev["steered"]],
               "steps": r.log}
    return summary
