"""Is the mechanism card right? The planted-mechanism benchmark (issue 22).

Every case of :data:`steerscope.analyses.planted.CASES` (weight surgery on a real model that
settles some claims by construction) is explained at ``--quick`` and default settings, and each
settled claim is scored right / undecided / wrong (:mod:`steerscope.explain.validate`).
The vector is the demo's formality vector (DIM on the first 32 pairs of the shipped formality
set, last prompt token, layer n_layers // 3). Results go to ``--out`` (one JSON per case, so an
interrupted run resumes) and a table is printed; ``--json`` prints the tally as one object.

    python benchmarks/validate_card.py --models smollm2-135m,gemma3-270m --settings quick,default --out runs/validate

Targets (issue 22): 0 wrong at default settings, at most 1 wrong at --quick, at most 25 % undecided at default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import steerscope as ss
from steerscope._files import dumps
from steerscope.analyses.planted import cases
from steerscope.data import data_path, read_jsonl
from steerscope.explain.context import Settings
from steerscope.explain.validate import OUTCOMES, CaseResult, run_case, tally


def formality_vector(lm: ss.LM) -> ss.SteeringVector:
    pairs = read_jsonl(data_path("traits", "formality.jsonl"))[:32]
    return ss.extract(lm, [p["positive"] for p in pairs], [p["negative"] for p in pairs], method="dim",
                      layers=[lm.n_layers // 3], positions=[-1], show_progress=False)


def run(models: list[str], settings: list[str], names: list[str] | None, out: Path) -> list[CaseResult]:
    results = []
    for model in models:
        lm = ss.load_model(model)
        vec = formality_vector(lm)
        for setting in settings:
            st = Settings.quick() if setting == "quick" else Settings()
            for case in cases(seeds=st.perp_seeds):
                if not case.expected or (names and case.name not in names):
                    continue
                path = out / f"{model}.{setting}.{case.name}.json"
                if path.is_file():
                    results.append(CaseResult.from_dict(json.loads(path.read_text())))
                    continue
                res = run_case(lm, vec, case, st, setting)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(dumps(res.to_dict()))
                results.append(res)
                print(f"{model} {setting} {case.name}: {res.outcomes} ({res.seconds:.0f} s, alpha {res.alpha:.3g})",
                      file=sys.stderr, flush=True)
    return results


def table(results: list[CaseResult]) -> str:
    lines = ["| setting | claim | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    for setting in sorted({r.setting for r in results}):
        t = tally([r for r in results if r.setting == setting])
        for rule in sorted(t, key=lambda k: (k == "all", k)):
            lines.append(f"| {setting} | {rule} | " + " | ".join(str(t[rule][o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated model aliases (default: smollm2-135m)")
    ap.add_argument("--settings", default="quick,default", help="comma-separated: quick, default (default: both)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: every case with claims)")
    ap.add_argument("--out", default="runs/validate_card", help="result folder (default: runs/validate_card)")
    ap.add_argument("--json", action="store_true", help="print the tally per setting as one JSON object")
    a = ap.parse_args()
    res = run(a.models.split(","), a.settings.split(","), a.cases.split(",") if a.cases else None, Path(a.out))
    if a.json:
        print(dumps({s: tally([r for r in res if r.setting == s]) for s in {r.setting for r in res}}, None))
    else:
        print(table(res))


if __name__ == "__main__":
    main()
