"""``steerscope tune``: its options and its command (registered by :mod:`steerscope.cli`).

Arguments and both contrast files are checked before the model loads; the run folder is resumable.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable

from steerscope import _cliargs as T
from steerscope._cliargs import safe
from steerscope.data.names import METHOD_NAMES as METHODS

SCORERS = ("logodds", "refusal", "formality", "sentiment", "politeness")
METHOD_NAMES = tuple(m for m in METHODS if m != "actadd")  # actadd takes one pair, a split needs six


def layer_spec(s: str) -> list[int]:
    """Layers as comma-separated indices and ranges: ``10,12``, ``4-20`` or ``2,4-8``."""
    out: list[int] = []
    for part in (x.strip() for x in s.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise argparse.ArgumentTypeError(f"expected layer indices and ranges such as 10,12 or 4-20, got {s!r}")
        out += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(set(out))


def position_specs(s: str) -> list[str]:
    """Candidate steering scopes, comma-separated: all, prompt, generated, last-K."""
    specs = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in specs if x not in ("all", "prompt", "generated") and not re.fullmatch(r"last-\d+", x)]
    if not specs or bad:
        raise argparse.ArgumentTypeError(f"expected scopes such as all,prompt (all, prompt, generated, last-K), got {s!r}")
    return list(dict.fromkeys(specs))


def positive_float(s: str) -> float:
    """A finite number > 0."""
    x = T.finite_float(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}")
    return x


def add_parser(sub: Any, common: Callable[..., None]) -> None:
    """Register ``tune`` on the subcommand set ``sub`` (``common`` adds --model, --device, --json)."""
    t = sub.add_parser("tune", help="pick layer, alpha and positions on held-out data; write them into the vector",
                       description="Split contrast pairs into train/validation/test, extract on train, search "
                                   "layer x alpha x positions on validation (Optuna TPE), measure once on test, and "
                                   "save the chosen vector with its recommendation (docs/tune.md).")
    t.add_argument("--positive", default=None, help="positive " + T.EXAMPLES_HELP)
    t.add_argument("--negative", default=None, help="negative examples, paired with the positives by line; same formats")
    t.add_argument("--pairs", default=None, help=T.PAIRS_HELP)
    t.add_argument("--out", required=True, help="output folder (resumable): vector.safetensors, tune.json, report.html")
    t.add_argument("--method", default="dim", choices=METHOD_NAMES, help="extraction method, one of %(choices)s (default: %(default)s)")
    t.add_argument("--scorer", default="logodds", choices=SCORERS, help="behaviour score, one of %(choices)s (default: "
                   "%(default)s): teacher-forced log-odds of the positive vs the negative continuation (no classifier), or greedy responses scored by "
                   "the refusal matcher or a validated trait classifier")
    t.add_argument("--layers", default=None, type=layer_spec, help="candidate layers, e.g. 4-20 or 8,10,12 "
                   "(default: up to 12 layers evenly spaced from 15 %% to 85 %% of the depth)")
    t.add_argument("--positions", default=["all", "prompt"], type=position_specs,
                   help="candidate steering scopes from all, prompt, generated, last-K (default: all,prompt)")
    t.add_argument("--kl-budget", default=1.0, type=positive_float, help="nats allowed to the worst-5 %% next-token "
                   "KL on neutral prompts before the objective is penalised (default: 1.0)")
    t.add_argument("--budget-evals", default=None, type=T.positive_int, help="configurations the search may score "
                   "(default: a quarter of the grid layers x positions x --n-alphas)")
    t.add_argument("--n-alphas", default=8, type=T.positive_int, help="doses per layer in the grid (default: 8)")
    t.add_argument("--exhaustive", action="store_true", help="score the whole grid instead of searching")
    t.add_argument("--seed", default=0, type=int, help="seed of the split, the search and the bootstrap (default: 0)")
    t.add_argument("--force", action="store_true", help="recompute finished steps")
    common(t)
    t.set_defaults(func=cmd_tune)


def cmd_tune(a: argparse.Namespace) -> None:
    """Run ``tune`` and print the summary (``--json``: one object)."""
    import steerscope as ss
    from steerscope._files import dumps
    from steerscope.runs import check_free, check_run_config
    from steerscope.tune import Settings, tune
    from steerscope.tune.tuner import run_config

    T.check_out_folder(a.out)  # everything the model is not needed for is checked before it loads
    check_free(a.out)
    pos, neg = T.contrast(a, "tune")
    known = run_config(a.model, pos, neg, a.method, a.scorer, sorted(set(a.layers)) if a.layers else None,
                       a.positions, a.kl_budget, a.budget_evals, a.exhaustive, a.seed, Settings(n_alphas=a.n_alphas))
    check_run_config(a.out, {k: v for k, v in known.items() if v is not None}, force=a.force, partial=True)
    lm = ss.load_model(a.model, device=a.device, dtype=a.dtype)
    res = tune(lm, pos, neg, method=a.method, scorer=None if a.scorer == "logodds" else a.scorer, layers=a.layers,
               positions=a.positions, kl_budget=a.kl_budget, budget_evals=a.budget_evals, exhaustive=a.exhaustive,
               seed=a.seed, out=a.out, force=a.force, settings=Settings(n_alphas=a.n_alphas),
               show_progress=not a.json)
    if a.json:
        print(dumps(res.summary(), None))
        return
    r, t, s = res.recommended, res.test, res.search
    lo, hi = t.effect.ci95
    ci = f"[{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else "[undefined]"
    print(f"recommended: layer {r.layer}, alpha {r.alpha:.4g} (range {r.alpha_range[0]:.4g} to {r.alpha_range[1]:.4g}), "
          f"positions {safe(r.positions)}, site {r.site}")
    print(f"test ({t.effect.n} pairs): effect {t.effect.value:.4g} {ci} ({t.metric}); worst-5 % KL "
          f"{t.kl_worst5.value:.3g} (budget {r.kl_budget:g})")
    print(f"search: {s.mode}, {s.evaluations} of a {s.grid_size}-point grid; split {res.split}")
    print(f"vector: {safe(res.vector_path)}\nreport: {safe(res.report_path)}")
