"""The ``steerscope`` command line: a thin front end over the library.

Importing this module and building the parser import no torch or transformers (``--help``, ``vectors``
and ``inspect`` start in well under 2 s; ``benchmarks/bench_startup.py``): each command imports what it
needs when it runs. User errors (:class:`~steerscope.errors.SteerscopeError`, bad arguments, unreadable files) print one
``error:`` line and exit 2; anything else prints one line and exits 1 (``--debug`` shows the traceback).
Arguments and input files are validated before a model is loaded. Commands that compute figures
accept ``--json`` and then print exactly one strict JSON object on stdout (never NaN/Infinity).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from steerscope import _cliargs as T
from steerscope._cliargs import safe
from steerscope._files import dumps
from steerscope.data.names import ALIAS_NAMES, DEFAULT_MODEL, METHOD_NAMES
from steerscope.errors import SteerscopeError, VectorError

# Each study package follows steerscope.studies.protocol: Config (with add_arguments / from_args), run, write_report.
STUDIES = {
    "refusal": "steerscope.studies.refusal",
    "reasoning": "steerscope.studies.reasoning",
    "identifiability": "steerscope.studies.identifiability",
    "refusal-mechanisms": "steerscope.studies.refusal_mechanisms",
}


SECTION_NAMES = ("lens", "attribution", "frozen", "circuit", "sparsity", "identifiability")  # explain.sections


def _emit(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(dumps(obj, None) if as_json else text)


def _parse_alphas(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SteerscopeError(f"--alpha takes numbers separated by commas, got {s!r}") from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise VectorError(f"--alpha must be finite numbers, got {s!r}")
    return vals


def cmd_extract(a: argparse.Namespace) -> None:
    import steerscope as ss

    T.check_out_file(a.out)
    pos, neg = T.contrast(a, "extract")
    lm = ss.load_model(a.model, device=a.device, dtype=a.dtype)
    bad = [k for k in a.layers or [] if k >= lm.n_layers]
    if bad:
        raise T.ArgError(f"--layers {bad} out of range: {lm.name} has layers 0..{lm.n_layers - 1}")
    vec = ss.extract(lm, pos, neg, method=a.method, layers=a.layers, positions=a.positions, batch_size=a.batch_size,
                     site=a.site, system=a.system, chat=a.chat, show_progress=not a.json)
    vec.save(a.out)
    info = {"out": a.out, "layers": vec.layers, "norms": vec.norms(), "method": a.method, "n_positive": len(pos),
            "n_negative": len(neg), "site": a.site}
    _emit(info, a.json, f"saved {a.out}: layers {vec.layers}, norms " +
          ", ".join(f"{k}: {v:.3f}" for k, v in vec.norms().items()))


def cmd_generate(a: argparse.Namespace) -> None:
    import steerscope as ss

    vec = ss.SteeringVector.load(a.vector) if a.vector else None  # validated before the model loads
    if vec is not None and a.layers:
        vec = vec.select(a.layers)
    alphas = _parse_alphas(a.alpha)
    relative = _parse_alphas(a.alpha_relative) if a.alpha_relative is not None else None
    prompts = a.prompt or ["Tell me about your weekend."]
    model = a.model or _vector_model(vec)
    if a.model is None and model is not None:
        print(f"note: no --model given; using {safe(model)}, the model the vector was made on", file=sys.stderr)
    lm = ss.load_model(model or DEFAULT_MODEL, device=a.device, dtype=a.dtype)
    doses: dict[str, Any] = {}
    if vec is not None:
        if str(a.vector).endswith(".gguf"):  # direction.{n_layers-1} needs the model's depth
            vec = ss.SteeringVector.load(a.vector, n_layers=lm.n_layers)
            vec = vec.select(a.layers) if a.layers else vec
        vec.check_compatible(lm)
        resid = _resid_norms(lm, vec, prompts)
        if relative is not None:  # R * |resid| / |v|, averaged over the vector's layers
            scale = sum(r / max(float(vec[k].norm()), 1e-12) for k, r in resid.items()) / len(resid)
            alphas = [r * scale for r in relative]
        doses = _doses(vec, alphas, resid)
        for key, per_layer in doses.items():
            print(f"relative dose alpha*|v|/|resid| at alpha={float(key):.4g}: " +
                  ", ".join(f"layer {k}: {d:.3g}" for k, d in per_layer.items()), file=sys.stderr)
    sampling = {"do_sample": a.do_sample, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                "seed": a.seed}
    base = ss.generate(lm, prompts, max_new_tokens=a.max_new_tokens, show_progress=not a.json, **sampling)
    rows: dict[str, Any] = {"prompts": prompts, "unsteered": base, "steered": {}}
    for alpha in alphas if vec is not None else []:
        rows["steered"][str(alpha)] = ss.generate(lm, prompts, vector=vec, alpha=alpha,
                                                  max_new_tokens=a.max_new_tokens, positions=a.positions,
                                                  show_progress=not a.json, **sampling)
    meta = {"model": lm.name, "vector": a.vector, "layers": vec.layers if vec is not None else None,
            "positions": a.positions, "alpha": alphas if vec is not None else None,
            "relative_dose": doses or None, "max_new_tokens": a.max_new_tokens, **sampling}
    if a.json:
        print(dumps({**meta, **rows}, None))
        return
    for i, p in enumerate(prompts):
        print(f"=== prompt: {safe(p)}")
        print(f"--- unsteered:\n{_text(base[i])}")
        for alpha, outs in rows["steered"].items():
            print(f"--- steered (alpha={alpha}):\n{_text(outs[i])}")


def _vector_model(vec: Any) -> str | None:
    """The model a vector's provenance names, when it can be loaded here (an alias, or a local model
    folder or .gguf file that exists); else None."""
    name = vec.provenance.model if vec is not None else None
    if not isinstance(name, str) or not name:
        return None
    if name in ALIAS_NAMES:
        return name
    try:
        path = Path(name)
        local = (path / "config.json").is_file() or (name.endswith(".gguf") and path.is_file())
    except (OSError, ValueError):  # not a path here
        return None
    return name if local else None


def _text(s: str) -> str:
    """Generated text for the terminal: line breaks kept, every other control character escaped."""
    return "\n".join(safe(line) for line in s.strip().split("\n"))


def _resid_norms(lm: Any, vec: Any, prompts: list[str]) -> dict[int, float]:
    """The median residual norm at each of the vector's layers, measured on (up to 4 of) the prompts."""
    import torch

    import steerscope as ss

    sites = [f"blocks.{k}.{vec.site}" for k in vec.layers]
    with torch.no_grad(), ss.recording(lm, sites) as cache:
        lm.model(**lm.tokenize([lm.format_chat(p) for p in prompts[:4]]))
    return {k: float(cache[site].float().norm(dim=-1).median()) for k, site in zip(vec.layers, sites)}


DEGENERATE_DOSE = 1.0  # relative dose above which outputs often degenerate (issue 26: a vector looped at 1.4x)


def _doses(vec: Any, alphas: list[float], resid: dict[int, float]) -> dict[str, dict[str, float]]:
    """The relative dose alpha*|v_k|/|resid_k| per alpha and layer; one warning, naming the largest, when any
    is above :data:`DEGENERATE_DOSE`."""
    out = {str(a): {str(k): abs(a) * float(vec[k].norm()) / max(r, 1e-12) for k, r in resid.items()} for a in alphas}
    ratio, alpha, k = max(((d, a, k) for a, per_layer in out.items() for k, d in per_layer.items()),
                          key=lambda t: t[0], default=(0.0, "", ""))
    if ratio > DEGENERATE_DOSE:
        warnings.warn(f"relative dose alpha*|v|/|resid| is {ratio:.2g}x at alpha={float(alpha):.4g}, layer {k} "
                      f"(residual norm {resid[int(k)]:.3g}); outputs often degenerate from about "
                      f"{DEGENERATE_DOSE:g}x (lower --alpha, or --alpha-relative below {DEGENERATE_DOSE:g})",
                      stacklevel=2)
    return out


def _view(name: str) -> Any:
    """A vector file or shipped name as a :class:`~steerscope.data.vector_file.VectorView`: read without
    torch unless it is a ``.gguf`` control vector (whose reader needs the SteeringVector)."""
    from steerscope.data.vector_file import VectorView, resolve

    if resolve(name).suffix != ".gguf":
        return VectorView.load(name)
    import steerscope as ss

    vec = ss.SteeringVector.load(name)
    return VectorView({k: v.numpy() for k, v in vec.directions.items()}, vec.site, vec.provenance)


def cmd_inspect(a: argparse.Namespace) -> None:
    vec = _view(a.vector)
    info = _vector_info(vec)
    if a.compare:
        other = _view(a.compare)
        shared = [k for k in vec.layers if k in other.layers]
        info["compare"] = {**_vector_info(other), "only_first": [k for k in vec.layers if k not in shared],
                           "only_second": [k for k in other.layers if k not in shared]}
        if other.d_model != vec.d_model:
            raise VectorError(f"cannot compare: {a.vector} has size {vec.d_model}, {a.compare} has {other.d_model}")
        info["cosine"] = vec.cosine(other) if shared else {}
    if a.json:
        print(dumps(info, None))
        return
    _print_vector(vec, info, a.vector)
    if a.compare:
        _print_vector(other, info["compare"], a.compare)
        c = info["compare"]
        if c["only_first"] or c["only_second"]:
            print(f"layers differ: only in {safe(a.vector)}: {c['only_first'] or 'none'}; only in {safe(a.compare)}: "
                  f"{c['only_second'] or 'none'}")
        if not info["cosine"]:
            print("no shared layers: no cosine")
        for k, cos in info["cosine"].items():
            print(f"  cos at layer {k:3d}: {cos:+.4f}")


def _vector_info(vec: Any) -> dict[str, Any]:
    """Site, layers, size, norms and provenance of a vector, as ``inspect --json`` shows them."""
    return {"site": vec.site, "layers": vec.layers, "d_model": vec.d_model, "norms": vec.norms(),
            "provenance": asdict(vec.provenance)}


def _print_vector(vec: Any, info: dict[str, Any], name: str) -> None:
    """The text form of :func:`_vector_info`."""
    print(f"{safe(name)}: site {safe(vec.site)}, d_model {vec.d_model}, layers {vec.layers}")
    for k, n in vec.norms().items():
        print(f"  layer {k:3d}: norm {n:.4f}")
    for key, val in info["provenance"].items():
        if val not in (None, {}, []) and key != "use":
            print(f"  {key}: {safe(val)}")
    if vec.provenance.use is not None:
        print("  use (how the file is meant to be applied):")
        for key, val in ((k, v) for k, v in info["provenance"]["use"].items() if v not in (None, [])):
            print(f"    {key}: {safe(val)}")


def cmd_vectors(a: argparse.Namespace) -> None:
    from steerscope.data import shipped_vectors  # torch-free

    names = shipped_vectors()
    _emit({"vectors": names}, a.json, "\n".join(names) if names else "no shipped vectors")


def cmd_demo(a: argparse.Namespace) -> None:
    """Extract a formality vector on the embedded model and show steered text."""
    import steerscope as ss
    from steerscope.data import data_path, read_jsonl

    lm = ss.load_model(a.model, device=a.device, dtype=a.dtype)
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
        print(dumps(out, None))
        return
    print(f"steerscope demo: formality vector (DIM, 32 pairs) at layer {layer} of {lm.name}, alpha ±{a.alpha}")
    for i, p in enumerate(prompts):
        print(f"\n=== {p}\n--- unsteered:\n{base[i].strip()}\n--- +formality:\n{plus[i].strip()}"
              f"\n--- -formality:\n{minus[i].strip()}")


def cmd_serve(a: argparse.Namespace) -> None:
    from steerscope.backends.serve import serve

    serve(a.model_name, a.vectors, host=a.host, port=a.port, extra=a.vllm_args, device=a.device,
          dtype=a.dtype, max_body_mib=a.max_body_mib, tensor_parallel_size=a.tensor_parallel_size,
          executor=a.distributed_executor_backend, compiled=a.compiled)


def cmd_vllm_setup(a: argparse.Namespace) -> None:
    from steerscope.backends.serve import setup_env

    secs = setup_env()
    _emit({"seconds": secs}, a.json, f"engine environment ready ({secs:.0f} s)")


def cmd_explain(a: argparse.Namespace) -> None:
    """The mechanism card of a vector: writes OUT/card.json and OUT/card.html."""
    import steerscope as ss
    from steerscope.data import load_examples
    from steerscope.explain.card import check_inputs
    from steerscope.runs import check_free

    T.check_out_folder(a.out)  # everything the model is not needed for is checked before it loads
    check_free(a.out)
    vec = ss.SteeringVector.load(a.vector)
    check_inputs(vec, a.alpha, a.layer)
    prompts = None
    if a.prompts:
        prompts = [p if isinstance(p, str) else p[0] for p in load_examples(a.prompts)]
    model = a.model or _vector_model(vec)
    if a.model is None and model is not None:
        print(f"note: no --model given; using {safe(model)}, the model the vector was made on", file=sys.stderr)
    _check_card_folder(a, vec, prompts, model or DEFAULT_MODEL)
    lm = ss.load_model(model or DEFAULT_MODEL, device=a.device, dtype=a.dtype)
    card = ss.explain(lm, vec, prompts, alpha=a.alpha, scorer=None if a.scorer == "none" else a.scorer,
                      quick=a.quick, out=a.out, layer=a.layer, force=a.force, show_progress=not a.json,
                      sections=a.sections)
    effect = next((c for c in card.claims if c.rule == "dose.effect"), None)
    if effect is not None and effect.status != "supported":
        print(f"warning: at alpha {card.vector.alpha:.3g} the effect is not distinguishable from a random direction's "
              f"({effect.status}: {effect.evidence}); the mechanism claims below describe a weak or generic effect",
              file=sys.stderr)
    if a.json:
        print(dumps(card.to_dict(), None))
        return
    print(f"card: {Path(a.out) / 'card.html'} and {Path(a.out) / 'card.json'}\n{card.verdict}")


def _check_card_folder(a: argparse.Namespace, vec: Any, prompts: list[str] | None, model: str) -> None:
    """Refuse an existing ``--out`` card folder of another configuration before the model loads, naming
    the settings that differ (the card's own check, :func:`steerscope.explain.card.card_config`)."""
    from steerscope.data import neutral_prompts
    from steerscope.explain.card import card_config
    from steerscope.explain.context import Settings
    from steerscope.runs import check_run_config

    st = Settings.quick() if a.quick else Settings()
    config = card_config(model, vec, prompts or neutral_prompts(8 if a.quick else 16), a.alpha, a.layer,
                         None if a.scorer == "none" else a.scorer, st, a.sections)
    # the model's name is compared once it has loaded (the card's own check): an LM may carry another name
    check_run_config(a.out, {k: v for k, v in config.items() if k != "model"}, force=a.force, partial=True)


def cmd_study(a: argparse.Namespace) -> None:
    from steerscope.runs import check_free, check_run_config

    T.check_out_folder(a.out)
    check_free(a.out)
    T.check_numbers(a)
    study = importlib.import_module(STUDIES[a.study])
    if not a.report_only:  # a folder of another configuration is refused before any model loads
        check_run_config(a.out, study.Config.from_args(a).identity(), force=a.force)
    if a.report_only:
        summary: dict[str, Any] = {"report": str(study.write_report(Path(a.out)))}
    else:
        summary = study.run(study.Config.from_args(a), Path(a.out), device=a.device, force=a.force)
    if a.json:
        print(dumps(summary, None))
    else:
        print(f"report: {safe(summary.get('report'))}")


DTYPES = T.DTYPES
DEVICE_HELP = "cpu, auto, cuda, cuda:N or mps (default: %(default)s)"
EXAMPLES_HELP = T.EXAMPLES_HELP


def _common(sp: argparse.ArgumentParser, model: bool = True, model_default: str | None = DEFAULT_MODEL) -> None:
    """``--model``, ``--device`` and ``--dtype`` (when the command loads a model) and ``--json``."""
    if model:  # no default: the command picks one (generate: the vector's model)
        help_ = "alias, folder, .gguf or hub id " + ("(default: %(default)s)" if model_default else (
            f"(default: the model named in the vector's provenance when it can be loaded, else {DEFAULT_MODEL})"))
        sp.add_argument("--model", default=model_default, help=help_)
        sp.add_argument("--device", default="cpu", type=T.device, help=DEVICE_HELP)
        sp.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="weights dtype, one of %(choices)s (default: %(default)s)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one builder per subcommand."""
    p = T.Parser(prog="steerscope", description="Activation steering and its mechanisms.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_extract, _add_generate, _add_inspect, _add_vectors, _add_demo, _add_serve, _add_vllm_setup,
                _add_explain):
        add(sub)
    from steerscope.tune import command as tune_command  # torch-free, like every parser builder here

    tune_command.add_parser(sub, _common)
    from steerscope.backends import verify_command  # steerscope verify (its options and command live there)

    verify_command.add_parser(sub, _common)
    _add_studies(sub.add_parser("study", help="run a study end to end and write a report",
                                description="Run a study end to end and write its report (docs/studies.md)."))
    return p


def _add_extract(sub: Any) -> None:
    """``extract``: a vector from contrast examples."""
    e = sub.add_parser("extract", help="extract a vector from contrast files")
    from steerscope.sites import RESIDUAL_POINTS

    e.add_argument("--positive", default=None, help="positive " + EXAMPLES_HELP)
    e.add_argument("--negative", default=None, help="negative examples, paired with the positives by line; same "
                   "formats")
    e.add_argument("--pairs", default=None, help=T.PAIRS_HELP)
    e.add_argument("--site", default="resid_pre", choices=RESIDUAL_POINTS,
                   help="where in each block to read and later steer, one of %(choices)s (default: %(default)s)")
    e.add_argument("--system", default=None, help="system prompt for the chat template (default: none)")
    e.add_argument("--chat", default=True, action=argparse.BooleanOptionalAction,
                   help="apply the model's chat template")
    e.add_argument("--method", default="dim", choices=list(METHOD_NAMES),
                   help="extraction method, one of %(choices)s (default: %(default)s)")
    e.add_argument("--layers", default=None, type=T.layer_list, help="comma-separated layers, e.g. 10,12 "
                   "(default: middle layer)")
    e.add_argument("--positions", default=[-1], type=T.int_positions,
                   help="comma-separated token positions, e.g. -1 or -3,-2,-1 (default: -1)")
    e.add_argument("--batch-size", type=T.positive_int, default=16, help="prompts per forward pass "
                   "(default: %(default)s)")
    e.add_argument("--out", required=True, help="output .safetensors file")
    _common(e)
    e.set_defaults(func=cmd_extract)


def _add_generate(sub: Any) -> None:
    """``generate``: unsteered and steered text side by side."""
    g = sub.add_parser("generate", help="unsteered and steered text side by side")
    g.add_argument("--vector", default=None, help=f"{T.VECTOR_HELP} (default: none, unsteered text only)")
    g.add_argument("--prompt", action="append", help="a prompt; repeat the option for several (default: one "
                   "built-in prompt)")
    dose = g.add_mutually_exclusive_group()
    dose.add_argument("--alpha", default="1.0", help="one value or a comma-separated sweep, e.g. -4,-2,2,4 "
                      "(default: %(default)s)")
    dose.add_argument("--alpha-relative", default=None, help="dose relative to the residual stream instead: "
                      "alpha = R*|resid|/|v| (averaged over the vector's layers); one R or a comma list, e.g. -0.5,0.5 "
                      "(default: none, use --alpha)")
    g.add_argument("--layers", default=None, type=T.layer_list, help="comma-separated layers of the vector to "
                   "steer at (default: all its layers)")
    g.add_argument("--positions", default="all", type=T.steer_positions,
                   help="all, prompt, generated, last-K or comma-separated integers (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=T.positive_int, default=48, help="tokens to generate "
                   "(default: %(default)s)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=T.positive_float, default=1.0, help="sampling temperature with "
                   "--do-sample (default: %(default)s)")
    g.add_argument("--top-p", type=T.probability, default=1.0, help="nucleus sampling with --do-sample: keep the "
                   "likeliest tokens whose probabilities sum to P, 0 < P <= 1 (default: %(default)s, off)")
    g.add_argument("--top-k", type=T.nonnegative_int, default=0, help="with --do-sample, keep the K likeliest tokens "
                   "(default: %(default)s, off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler's own generator with --do-sample; the "
                   "same seed gives the same text (default: %(default)s)")
    _common(g, model_default=None)
    g.set_defaults(func=cmd_generate)


def _add_inspect(sub: Any) -> None:
    """``inspect``: layers, norms, provenance, cosine."""
    i = sub.add_parser("inspect", help="layers, norms, provenance, cosine to another vector")
    T.add_vector(i)
    i.add_argument("--compare", default=None, help="a second vector: print the per-layer cosine to it "
                   "(default: none)")
    _common(i, model=False)
    i.set_defaults(func=cmd_inspect)


def _add_vectors(sub: Any) -> None:
    """``vectors``: the shipped vectors."""
    v = sub.add_parser("vectors", help="list vectors shipped in the package")
    _common(v, model=False)
    v.set_defaults(func=cmd_vectors)


def _add_demo(sub: Any) -> None:
    """``demo``: a formality vector on the embedded model."""
    d = sub.add_parser("demo", help="extract a formality vector and steer the embedded model")
    d.add_argument("--layer", type=T.nonnegative_int, default=None, help="layer to extract at (default: a third of the depth)")
    d.add_argument("--alpha", type=T.finite_float, default=6.0, help="steering scale; the demo shows +alpha and "
                   "-alpha (default: %(default)s)")
    d.add_argument("--max-new-tokens", type=T.positive_int, default=40, help="tokens to generate "
                   "(default: %(default)s)")
    _common(d)
    d.set_defaults(func=cmd_demo)


def _add_serve(sub: Any) -> None:
    """``serve``: vLLM's server with per-request steering."""
    sv = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with steering chosen per request")
    sv.add_argument("model_name", metavar="MODEL", help="alias, folder, .gguf or hub id")
    sv.add_argument("--vectors", default=None, help="name=path,... vectors requests may name (default: none)")
    sv.add_argument("--host", default="127.0.0.1", type=T.host, help="IP address or host name to listen on "
                    "(default: %(default)s)")
    sv.add_argument("--port", type=T.port, default=8000, help="TCP port, 1..65535 (default: %(default)s)")
    sv.add_argument("--device", default="cpu", type=T.device, help=DEVICE_HELP)
    sv.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype of the served model (and "
                    "vLLM's --dtype), one of %(choices)s (default: %(default)s)")
    sv.add_argument("--max-body-mib", type=T.positive_int, default=8, help="largest request body in MiB; a larger "
                    "one gets HTTP 413 (default: %(default)s)")
    sv.add_argument("--tensor-parallel-size", type=T.positive_int, default=1, help="split the model over this "
                    "many workers (vLLM tensor parallelism; on CPU each is bound to its share of this process's "
                    "CPUs) (default: %(default)s)")
    sv.add_argument("--distributed-executor-backend", default=None, choices=("uni", "mp", "ray"),
                    help="vLLM's executor: uni (one worker in the engine process), mp (one process per rank) or "
                    "ray (a Ray cluster); default: uni for one worker, mp for more")
    sv.add_argument("--compiled", action="store_true", help="serve vLLM's compiled model (torch.compile; CUDA "
                    "graphs on GPU) with graph-safe steering sites; conditions and clamps run in the graph (about "
                    "5-9 %% slower per step), more than 3 rules or 4 conditions in one request get HTTP 400 (default: eager, every "
                    "steering option)")
    sv.add_argument("--vllm-args", default="", type=T.shell_words, help="more 'vllm serve' arguments, e.g. "
                    "'--max-model-len 2048' (default: none)")
    sv.set_defaults(func=cmd_serve)


def _add_vllm_setup(sub: Any) -> None:
    """``vllm-setup``: the engine environment."""
    vs = sub.add_parser("vllm-setup", help="create the vLLM engine environment ($STEERSCOPE_VLLM_ENV)")
    _common(vs, model=False)
    vs.set_defaults(func=cmd_vllm_setup)


def _add_explain(sub: Any) -> None:
    """``explain``: the mechanism card."""
    x = sub.add_parser("explain", help="mechanism card of a steering vector (card.html + card.json)",
                       description="Explain why a steering vector works: dose, logit lens, EAP-IG attribution, "
                                   "frozen-attention ablations, minimal circuit, sparsity, identifiability.")
    T.add_vector(x)
    x.add_argument("--prompts", default=None, help="prompts file (.txt one a line, .jsonl, .json, .csv); "
                   "default: the shipped neutral prompts")
    x.add_argument("--alpha", type=T.finite_float, default=None, help="steering scale (default: the upper end of the "
                   "recommended dose range; without a range, the largest alpha within the KL budget; the card states "
                   "which alpha it used and why)")
    x.add_argument("--scorer", default="none", choices=["refusal", "formality", "sentiment", "politeness", "none"],
                   help="score generations with the refusal matcher or a validated trait classifier: %(choices)s "
                   "(default: %(default)s)")
    x.add_argument("--quick", action="store_true", help="small sizes: 8 prompts, 12 response tokens, 3 EAP-IG steps, a "
                   "3-point circuit grid without bisection, 2 v_perp draws (more claims end undecided; timings in "
                   "docs/explain.md)")
    x.add_argument("--sections", type=T.name_list(SECTION_NAMES), default=None,
                   help=f"comma-separated sections to compute after vector and dose (default: all of "
                   f"{','.join(SECTION_NAMES)})")
    x.add_argument("--layer", type=T.nonnegative_int, default=None, help="layer to analyse for a multi-layer vector "
                   "(default: largest norm relative to the residual stream)")
    x.add_argument("--out", required=True, help="output folder (resumable: finished sections are reused)")
    x.add_argument("--force", action="store_true", help="recompute finished sections")
    x.add_argument("--model", default=None, help="alias, folder, .gguf or hub id (default: the model the vector's "
                   "provenance names when it is available here, else smollm2-135m)")
    x.add_argument("--device", default="cpu", type=T.device, help=DEVICE_HELP)
    x.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights dtype, one of %(choices)s (default: %(default)s)")
    x.add_argument("--json", action="store_true", help="print the card.json object on stdout")
    x.set_defaults(func=cmd_explain)


def _add_studies(s: argparse.ArgumentParser) -> None:
    """One subcommand per study; its options come from the study's ``Config`` (steerscope.studies.protocol)."""
    ssub = s.add_subparsers(dest="study", required=True)
    for name, package in STUDIES.items():
        module = importlib.import_module(package)  # a broken study import fails loudly here
        summary = (module.__doc__ or f"The {name} study.").strip().splitlines()[0]
        sp = ssub.add_parser(name, help=summary, description=summary)
        sp.add_argument("--device", default="cpu", type=T.device, help=DEVICE_HELP)
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--out", default=f"runs/{name}", help="run folder (resumable) (default: %(default)s)")
        sp.add_argument("--force", action="store_true", help="recompute finished steps")
        sp.add_argument("--report-only", action="store_true", help="rewrite the report from finished steps; run nothing")
        # --model, --seed and the study's own options
        importlib.import_module(package + ".config").Config.add_arguments(sp)
        sp.set_defaults(func=cmd_study)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for user errors, 1 for bugs, 130 on Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()  # outside the guard: a study package that cannot import is a loud bug

    def go() -> None:
        args = parser.parse_args(argv)
        args.func(args)

    return T.run_guarded(go, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
