"""Conditional induce-refusal (issue 24 §4): refuse only where a probe on the prompt says "harmful".

A gate is fitted (``ss.Condition.fit``) on the shipped harmful / harmless *train* prompts; the shipped
refusal DIM vector is added (+alpha, every position) only on rows whose gate opens. On the held-out *test*
prompts (100 harmful, 100 harmless by default) three arms are generated greedily: unsteered, conditional and
unconditional (the same vector on every row). Refusal is paper A's substring matcher
(``metrics.refusal.is_refusal``), with Wilson 95 % intervals; the paired comparisons (conditional vs
unsteered on each side) use the exact McNemar test, Holm-corrected over the family. It also reports the
gate's own test accuracy, and a second probe fitted at the steering layer: its accuracy and its cosine with
the steering direction (can one vector serve as both?).

Usage (one model a run; several CPU-minutes on Qwen2.5-Coder-0.5B)::

    python benchmarks/conditional_refusal.py --model qwen2.5-coder-0.5b --alpha 0.5 --out benchmarks/results/conditional_refusal
    python benchmarks/conditional_refusal.py --model smollm2-135m-safe --alpha 1.0 --out benchmarks/results/conditional_refusal
    python benchmarks/conditional_refusal.py --model qwen2.5-coder-0.5b --alpha 0.5 --reduce last  # gate on the last prompt token
    python benchmarks/conditional_refusal.py --model qwen2.5-coder-0.5b --alpha 0.5 --reduce last --max-fpr 0.05
    python benchmarks/conditional_refusal.py --model qwen2.5-coder-0.5b --alpha 0.5 --reduce last --max-fpr 0.05 \
        --gate-prompts all-but-test  # the gate fitted on every shipped prompt outside the test split
    python benchmarks/conditional_refusal.py --model qwen2.5-coder-0.5b --alpha 0.5 --reduce last --max-fpr 0.05 \
        --gate-prompts all-but-test --gate-positives complied  # positives: harmful prompts the model answers
    python benchmarks/conditional_refusal.py --model qwen2.5-coder-0.5b --alpha 0.5 --reduce last --max-fpr 0.05 \
        --gate-prompts all-but-test --or-reduce max  # c1 | c2: last-token or max-token gate, 2.5 % FPR each
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import steerscope as ss
from steerscope.data.refusal_prompts import load_split
from steerscope.metrics.refusal import is_refusal
from steerscope.stats import holm, mcnemar_exact, wilson


def rate(flags: list[bool]) -> dict[str, Any]:
    """Refusal rate with its Wilson 95 % interval and n."""
    k, n = sum(flags), len(flags)
    return {"rate": k / n, "ci95": list(wilson(k, n)), "k": k, "n": n}


def paired(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Exact McNemar of two paired binary outcomes: discordant counts and the two-sided p."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    return {"only_first": only_a, "only_second": only_b, "p": mcnemar_exact(only_a, only_b)}


def arms(lm: ss.LM, prompts: list[str], vec: ss.SteeringVector, alpha: float, gate: Any,
         max_new_tokens: int) -> dict[str, list[bool]]:
    """Refusal flags of the unsteered, conditional and unconditional arms on ``prompts``."""
    out = {}
    for name, kw in (("unsteered", {}), ("conditional", {"vector": vec, "alpha": alpha, "condition": gate}),
                     ("unconditional", {"vector": vec, "alpha": alpha})):
        texts = ss.generate(lm, prompts, max_new_tokens=max_new_tokens, **kw)
        out[name] = [is_refusal(t) for t in texts]
        out[name + "_samples"] = texts[:3]  # type: ignore[assignment]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="model alias (default: %(default)s)")
    ap.add_argument("--vector", default=None, help="refusal vector (default: <model>/refusal-dim, shipped)")
    ap.add_argument("--alpha", type=float, default=0.5, help="induce dose (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=128, help="train prompts per side for the gate (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=100, help="held-out test prompts per side (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens (default: %(default)s)")
    ap.add_argument("--reduce", default="mean", choices=("mean", "last", "max"),
                    help="how the gate pools the prompt's tokens, one of %(choices)s (default: %(default)s)")
    ap.add_argument("--max-fpr", type=float, default=None,
                    help="fit the gate for the most harmful prompts caught at this validation false-positive rate "
                         "on harmless ones (default: by balanced accuracy)")
    ap.add_argument("--gate-prompts", default="train", choices=("train", "all-but-test"),
                    help="prompts the gate is fitted on, one of %(choices)s: the shipped train split, or every "
                         "shipped prompt outside the test split (train + val + organism) (default: %(default)s)")
    ap.add_argument("--gate-positives", default="harmful", choices=("harmful", "complied"),
                    help="the gate's positive prompts, one of %(choices)s: every harmful fitting prompt, or only those "
                         "the unsteered model answers without refusing (greedy, --max-new-tokens; a refused prompt "
                         "gains nothing from the vector) (default: %(default)s)")
    ap.add_argument("--or-reduce", default=None, choices=("mean", "last", "max"),
                    help="a composite gate: also fit a gate that pools with this reduce, and open where either opens "
                         "(c1 | c2); each is fitted for half of --max-fpr, which it needs (default: one gate)")
    ap.add_argument("--probe", default="dim", choices=("dim", "logistic"),
                    help="how the gate's direction is fitted, one of %(choices)s: difference in means, or an L2 "
                         "logistic regression with C chosen on validation (default: %(default)s)")
    ap.add_argument("--out", default="benchmarks/results/conditional_refusal", help="output folder")
    a = ap.parse_args()
    if a.or_reduce is not None and a.max_fpr is None:
        ap.error("--or-reduce splits the --max-fpr budget between the two gates; give --max-fpr")
    t0 = time.time()
    lm = ss.load_model(a.model)
    vec = ss.SteeringVector.load(a.vector or f"{a.model}/refusal-dim")
    (layer,) = vec.layers
    # the gate must read a residual the steering has not touched yet: layers up to the steering layer
    splits = ("train",) if a.gate_prompts == "train" else ("train", "val", "organism")
    fit_on = {side: [p for s in splits for p in load_split(side, s)[: a.n_train if s == "train" else None]]
              for side in ("harmful", "harmless")}
    positives = fit_on["harmful"]
    if a.gate_positives == "complied":  # the prompts the vector has to change: harmful ones the model answers
        answers = ss.generate(lm, positives, max_new_tokens=a.max_new_tokens)
        positives = [p for p, t in zip(positives, answers, strict=True) if not is_refusal(t)]
    budget = a.max_fpr if a.or_reduce is None else a.max_fpr / 2  # a union of two gates: at most the sum of FPRs
    parts = [ss.Condition.fit(lm, positives, fit_on["harmless"], layers=range(layer + 1), reduce=r, seed=0,
                              max_fpr=budget, probe=a.probe) for r in (a.reduce, *([a.or_reduce] if a.or_reduce else []))]
    gate: Any = parts[0] if len(parts) == 1 else parts[0] | parts[1]
    harmful, harmless = load_split("harmful", "test")[: a.n_test], load_split("harmless", "test")[: a.n_test]
    res = {"harmful": arms(lm, harmful, vec, a.alpha, gate, a.max_new_tokens),
           "harmless": arms(lm, harmless, vec, a.alpha, gate, a.max_new_tokens)}
    tests = {f"{side}: conditional vs unsteered": paired(res[side]["conditional"], res[side]["unsteered"])
             for side in ("harmful", "harmless")}
    tests["harmless: unconditional vs conditional"] = paired(res["harmless"]["unconditional"],
                                                             res["harmless"]["conditional"])
    for t, p in zip(tests.values(), holm([t["p"] for t in tests.values()]), strict=True):
        t["p_holm"] = p
    at_steer = ss.Condition.fit(lm, load_split("harmful", "train")[: a.n_train],
                                load_split("harmless", "train")[: a.n_train], layers=[layer], reduce=a.reduce,
                                seed=0, probe=a.probe)
    cos = float(torch.nn.functional.cosine_similarity(at_steer.direction.float(), vec[layer].float(), dim=0))
    out = {"model": a.model, "vector": a.vector or f"{a.model}/refusal-dim", "steer_layer": layer, "alpha": a.alpha,
           "reduce": a.reduce, "or_reduce": a.or_reduce, "max_fpr": a.max_fpr, "probe": a.probe,
           "gate_prompts": {"splits": list(splits), "harmful": len(fit_on["harmful"]), "harmless": len(fit_on["harmless"]),
                            "positives": a.gate_positives, "n_positives": len(positives)},
           "positions": "all", "max_new_tokens": a.max_new_tokens, "gate": gate.to_dict(),
           "gate_report": parts[0].report.to_dict() if parts[0].report else None,
           "or_gate_report": parts[1].report.to_dict() if len(parts) > 1 and parts[1].report else None,
           "probe_at_steer_layer": {"cosine_with_steering_vector": cos,
                                    "report": at_steer.report.to_dict() if at_steer.report else None},
           "rates": {side: {arm: rate(res[side][arm]) for arm in ("unsteered", "conditional", "unconditional")}
                     for side in res},
           "samples": {side: {arm: res[side][arm + "_samples"] for arm in ("unsteered", "conditional", "unconditional")}
                       for side in res},
           "tests": tests, "seconds": round(time.time() - t0, 1)}
    path = Path(a.out)
    path.mkdir(parents=True, exist_ok=True)
    name = a.model + ("" if a.reduce == "mean" else f"-{a.reduce}") + ("" if a.max_fpr is None else f"-fpr{a.max_fpr:g}") \
        + ("" if a.gate_prompts == "train" else "-allgate") + ("" if a.gate_positives == "harmful" else "-complied") \
        + ("" if a.or_reduce is None else f"-or-{a.or_reduce}") + ("" if a.probe == "dim" else f"-{a.probe}")
    (path / f"{name}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    r = out["rates"]
    for side in ("harmful", "harmless"):
        print(side, {arm: f"{v['rate']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" for arm, v in r[side].items()})
    print("gate: layer", [g.layer for g in parts], "test balanced accuracy", out["gate_report"] and
          out["gate_report"].get("test_balanced_accuracy"), "| tests", json.dumps(tests))


if __name__ == "__main__":
    main()
