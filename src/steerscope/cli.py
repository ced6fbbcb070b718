"""The ``steerscope`` command line: a thin front end over the library.

User errors (:class:`~steerscope.errors.SteerscopeError`) print one line and exit 2. Commands
that compute figures accept ``--json`` and then print exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from steerscope.errors import SteerscopeError, VectorError

# Each study package follows steerscope.studies.protocol: Config (with add_arguments / from_args), run, write_report.
STUDIES = {
    "refusal": "steerscope.studies.refusal",
    "reasoning": "steerscope.studies.reasoning",
    "identifiability": "steerscope.studies.identifiability",
    "refusal-mechanisms": "steerscope.studies.refusal_mechanisms",
}


def _emit(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(obj, default=str) if as_json else text)


def _parse_layers(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SteerscopeError(f"--layers takes comma-separated integers, got {s!r}") from None


def _parse_alphas(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SteerscopeError(f"--alpha takes numbers separated by commas, got {s!r}") from None
    if not vals or any(v != v or v in (float("inf"), float("-inf")) for v in vals):
        raise VectorError(f"--alpha must be finite numbers, got {s!r}")
    return vals


def cmd_extract(a: argparse.Namespace) -> None:
    import steerscope as ss
    from steerscope.data import load_examples

    pos, neg = load_examples(a.positive), load_examples(a.negative)
    lm = ss.load_model(a.model, device=a.device)
    layers = _parse_layers(a.layers) if a.layers else None
    positions = [int(p) for p in a.positions.split(",")]
    vec = ss.extract(lm, pos, neg, method=a.method, layers=layers, positions=positions, batch_size=a.batch_size,
                     show_progress=not a.json)
    vec.save(a.out)
    info = {"out": a.out, "layers": vec.layers, "norms": vec.norms(), "method": a.method, "n_positive": len(pos),
            "n_negative": len(neg)}
    _emit(info, a.json, f"saved {a.out}: layers {vec.layers}, norms " +
          ", ".join(f"{k}: {v:.3f}" for k, v in vec.norms().items()))


def cmd_generate(a: argparse.Namespace) -> None:
    import steerscope as ss

    lm = ss.load_model(a.model, device=a.device)
    vec = ss.SteeringVector.load(a.vector) if a.vector else None
    if vec is not None:
        if a.layers:
            vec = vec.select(_parse_layers(a.layers))
        vec.check_compatible(lm)
    prompts = a.prompt or ["Tell me about your weekend."]
    alphas = _parse_alphas(a.alpha)
    base = ss.generate(lm, prompts, max_new_tokens=a.max_new_tokens, seed=a.seed)
    rows: dict[str, Any] = {"prompts": prompts, "unsteered": base, "steered": {}}
    for alpha in alphas if vec is not None else []:
        rows["steered"][str(alpha)] = ss.generate(lm, prompts, vector=vec, alpha=alpha,
                                                  max_new_tokens=a.max_new_tokens, positions=a.positions, seed=a.seed)
    if a.json:
        print(json.dumps(rows))
        return
    for i, p in enumerate(prompts):
        print(f"=== prompt: {p}")
        print(f"--- unsteered:\n{base[i].strip()}")
        for alpha, outs in rows["steered"].items():
            print(f"--- steered (alpha={alpha}):\n{outs[i].strip()}")


def cmd_inspect(a: argparse.Namespace) -> None:
    import steerscope as ss

    vec = ss.SteeringVector.load(a.vector)
    info: dict[str, Any] = {"site": vec.site, "layers": vec.layers, "d_model": vec.d_model, "norms": vec.norms(),
                            "provenance": vec.provenance.__dict__}
    if a.compare:
        info["cosine"] = vec.cosine(ss.SteeringVector.load(a.compare))
    if a.json:
        print(json.dumps(info, default=str))
        return
    print(f"site {vec.site}, d_model {vec.d_model}, layers {vec.layers}")
    for k, n in vec.norms().items():
        cos = f"  cos={info['cosine'][k]:+.4f}" if "cosine" in info and k in info["cosine"] else ""
        print(f"  layer {k:3d}: norm {n:.4f}{cos}")
    for key, val in vec.provenance.__dict__.items():
        if val not in (None, {}, []):
            print(f"  {key}: {val}")


def cmd_vectors(a: argparse.Namespace) -> None:
    from steerscope.vector import shipped_vectors

    names = shipped_vectors()
    _emit({"vectors": names}, a.json, "\n".join(names) if names else "no shipped vectors")


def cmd_demo(a: argparse.Namespace) -> None:
    """Extract a formality vector on the embedded model and show steered text."""
    import steerscope as ss
    from steerscope.data import data_path, read_jsonl

    lm = ss.load_model(a.model, device=a.device)
    pairs = read_jsonl(data_path("traits", "formality.jsonl"))[:32]
    layer = lm.n_layers // 3 if a.layer is None else a.layer
    vec = ss.extract(lm, [p["positive"] for p in pairs], [p["negative"] for p in pairs], method="dim",
                     layers=[layer], positions=[-1], show_progress=not a.json)
    prompts = ["Tell me about your weekend.", "Describe the city you live in."]
    base = ss.generate(lm, prompts, max_new_tokens=a.max_new_tokens)
    plus = ss.generate(lm, prompts, vector=vec, alpha=a.alpha, max_new_tokens=a.max_new_tokens)
    minus = ss.generate(lm, prompts, vector=vec, alpha=-a.alpha, max_new_tokens=a.max_new_tokens)
    out = {"model": lm.name, "layer": layer, "alpha": a.alpha, "norm": vec.norms()[layer],
           "prompts": prompts, "unsteered": base, "formal": plus, "casual": minus}
    if a.json:
        print(json.dumps(out))
        return
    print(f"steerscope demo: formality vector (DIM, 32 pairs) at layer {layer} of {lm.name}, alpha ±{a.alpha}")
    for i, p in enumerate(prompts):
        print(f"\n=== {p}\n--- unsteered:\n{base[i].strip()}\n--- +formality:\n{plus[i].strip()}"
              f"\n--- -formality:\n{minus[i].strip()}")


def cmd_study(a: argparse.Namespace) -> None:
    study = importlib.import_module(STUDIES[a.study])
    if a.report_only:
        summary: dict[str, Any] = {"report": str(study.write_report(Path(a.out)))}
    else:
        summary = study.run(study.Config.from_args(a), Path(a.out), device=a.device, force=a.force)
    if a.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"report: {summary.get('report')}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerscope", description="Activation steering and its mechanisms.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, model: bool = True) -> None:
        if model:
            sp.add_argument("--model", default="smollm2-135m", help="alias, folder, .gguf or hub id")
            sp.add_argument("--device", default="cpu")
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    e = sub.add_parser("extract", help="extract a vector from contrast files")
    e.add_argument("--positive", required=True)
    e.add_argument("--negative", required=True)
    e.add_argument("--method", default="dim")
    e.add_argument("--layers", default=None, help="e.g. 10,12 (default: middle layer)")
    e.add_argument("--positions", default="-1")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", required=True)
    common(e)
    e.set_defaults(func=cmd_extract)

    g = sub.add_parser("generate", help="unsteered and steered text side by side")
    g.add_argument("--vector", default=None)
    g.add_argument("--prompt", action="append")
    g.add_argument("--alpha", default="1.0", help="one value or a sweep: --alpha=-4,-2,2,4")
    g.add_argument("--layers", default=None)
    g.add_argument("--positions", default="all")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--seed", type=int, default=0)
    common(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="layers, norms, provenance, cosine to another vector")
    i.add_argument("vector")
    i.add_argument("--compare", default=None)
    common(i, model=False)
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("vectors", help="list vectors shipped in the package")
    common(v, model=False)
    v.set_defaults(func=cmd_vectors)

    d = sub.add_parser("demo", help="extract a formality vector and steer the embedded model")
    d.add_argument("--layer", type=int, default=None)
    d.add_argument("--alpha", type=float, default=6.0)
    d.add_argument("--max-new-tokens", type=int, default=40)
    common(d)
    d.set_defaults(func=cmd_demo)

    _add_studies(sub.add_parser("study", help="run a study end to end and write a report"))
    return p


def _add_studies(s: argparse.ArgumentParser) -> None:
    """One subcommand per study; its options come from the study's ``Config`` (steerscope.studies.protocol)."""
    ssub = s.add_subparsers(dest="study", required=True)
    for name, package in STUDIES.items():
        sp = ssub.add_parser(name)
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--out", default=f"runs/{name}")
        sp.add_argument("--force", action="store_true", help="recompute finished steps")
        sp.add_argument("--report-only", action="store_true", help="rewrite the report from finished steps; run nothing")
        # --model, --seed and the study's own options; a broken study import fails loudly here
        importlib.import_module(package + ".config").Config.add_arguments(sp)
        sp.set_defaults(func=cmd_study)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            args.func(args)
    except SteerscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished steps are saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
