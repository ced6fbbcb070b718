"""``steerscope verify``: its options and its command (registered by :mod:`steerscope.cli`).

Prints a per-backend table (``--json``: one object); exits 0 when every backend that ran agrees with the HF
path, 2 with one line naming the backend and its first differing prompt otherwise (docs/verify.md).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from steerscope import _cliargs as T
from steerscope._cliargs import safe
from steerscope.errors import BackendError

BACKEND_NAMES = ("hf", "vllm", "llamacpp")  # steerscope.backends.verify.VERIFY_BACKENDS (not imported: startup)


def add_parser(sub: Any, common: Callable[..., None]) -> None:
    """Register ``verify`` on the subcommand set ``sub`` (``common`` adds --model, --device, --dtype, --json)."""
    v = sub.add_parser("verify", help="check that a vector file steers the same on HF, vLLM and llama.cpp",
                       description="Apply the vector file's declared operation, site, positions and alpha on each "
                                   "backend and compare greedy tokens (and the next-token logit delta) with the "
                                   "Hugging Face path; exit 0 when all agree, 2 otherwise (docs/verify.md).")
    T.add_vector(v)
    v.add_argument("--backends", default=list(BACKEND_NAMES), type=T.name_list(BACKEND_NAMES),
                   help=f"comma-separated backends from {','.join(BACKEND_NAMES)}; hf is the reference and always "
                   f"runs (default: {','.join(BACKEND_NAMES)})")
    v.add_argument("--prompts", default=None, help="prompts file (.txt one a line, .jsonl, .json, .csv); "
                   "default: the first 6 shipped neutral prompts")
    v.add_argument("--alpha", type=T.finite_float, default=None, help="steering scale (default: the recommended "
                   "alpha of the file's use record; required when the file has none)")
    v.add_argument("--max-new-tokens", type=T.positive_int, default=32, help="greedy tokens per prompt "
                   "(default: %(default)s)")
    v.add_argument("--delta-tol", type=T.positive_float, default=0.05, help="largest relative error of the "
                   "next-token logit delta a backend may have and still agree (default: %(default)s)")
    common(v)
    v.set_defaults(func=cmd_verify)


def cmd_verify(a: argparse.Namespace) -> None:
    """Run ``verify`` and print the table (``--json``: one object); a difference is one error line, exit 2."""
    import steerscope as ss
    from steerscope._files import dumps
    from steerscope.backends.verify import plan_for, verify
    from steerscope.data import load_examples

    vec = ss.SteeringVector.load(a.vector)  # file, use record and prompts are checked before the model loads
    plan_for(vec, a.alpha)
    prompts = None
    if a.prompts:
        prompts = [p if isinstance(p, str) else p[0] for p in load_examples(a.prompts)]
    lm = ss.load_model(a.model, device=a.device, dtype=a.dtype)
    if str(a.vector).endswith(".gguf"):  # direction.{n_layers-1} needs the model's depth
        vec = ss.SteeringVector.load(a.vector, n_layers=lm.n_layers)
    res = verify(lm, vec, a.backends, prompts, alpha=a.alpha, max_new_tokens=a.max_new_tokens, delta_tol=a.delta_tol)
    if a.json:
        print(dumps(res.to_dict(), None))
    else:
        print(table(res))
    why = res.failure()
    if why is not None:
        raise BackendError(why)


def table(res: Any) -> str:
    """The text form of a :class:`~steerscope.backends.verify.VerifyResult`."""
    p = res.plan
    alpha = "-" if p.alpha is None else f"{p.alpha:.4g}"
    lines = [f"{safe(res.model)}: {p.operation} at {p.site} layers {p.layers}, positions {safe(p.positions)}, "
             f"alpha {alpha} ({p.source}); {len(res.prompts)} prompts x {res.max_new_tokens} greedy tokens",
             f"{'backend':<10} {'status':<10} {'identical':>9}  {'first differing prompt':<24} {'delta rel err':>13}"]
    for b in res.backends:
        ran = bool(b.prompts)
        ident = f"{b.identical}/{len(b.prompts)}" if ran else "-"
        first = b.first_differing_prompt
        where = "-" if first is None else f"{first} (token {b.prompts[first].first_diff})"
        err = "-" if b.delta_rel_err is None else f"{b.delta_rel_err:.2e}"
        lines.append(f"{b.backend:<10} {b.status:<10} {ident:>9}  {where:<24} {err:>13}")
    lines += [f"  {b.backend} {b.status}: {safe(b.reason)}" for b in res.backends if b.reason]
    if res.changed is not None:
        lines.append(f"the steering changes HF's greedy tokens on {res.changed}/{len(res.prompts)} prompts")
    if res.vacuous:
        lines.append("warning: the steering changes no prompt's tokens here, so token agreement checks only the "
                     "unsteered model; raise --alpha or --max-new-tokens, or use other --prompts")
    return "\n".join(lines)
