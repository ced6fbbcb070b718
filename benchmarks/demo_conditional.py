"""A small real check of ss.Condition.fit on the embedded model (SmolLM2-135M-Instruct).

The gate should open on requests for formal text and stay shut on requests for casual text: the 60 prompt
pairs of data/traits/formality.jsonl (positive: formal request, negative: casual request). Prints the fit
record (layer, threshold, validation and test balanced accuracy with the 95 % interval, n) as JSON.

Run: python benchmarks/demo_conditional.py [--reduce mean|last|max] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import steerscope as ss
from steerscope.data import data_path, read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reduce", default="mean")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lm = ss.load_model("smollm2-135m")
    rows = read_jsonl(data_path("traits", "formality.jsonl"))
    pos, neg = [r["positive"] for r in rows], [r["negative"] for r in rows]
    cond = ss.Condition.fit(lm, pos, neg, reduce=args.reduce, seed=args.seed)
    assert cond.report is not None
    print(json.dumps({"model": lm.name, "n_pairs": len(rows), **cond.report.to_dict()}, indent=1))


if __name__ == "__main__":
    main()
