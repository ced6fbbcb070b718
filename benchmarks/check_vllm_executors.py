"""Do vLLM's uni and multiprocessing executors give the same steered tokens? (docs/vllm.md, executor caveat)

Runs the same greedy steered generations (``prompt`` / ``generated`` / ``all`` positions and a mixed
batch) on one engine per executor and prints, per case, the number of equal tokens per row next to
the row lengths. Needs the engine environment (``steerscope vllm-setup``).

Example:
    VLLM_ENABLE_V1_MULTIPROCESSING=1 python benchmarks/check_vllm_executors.py uni mp
"""

from __future__ import annotations

import json
import sys
import time

import torch

import steerscope as ss
from steerscope.backends import vllm as bv

PROMPTS = ["Tell me about the ocean.", "Write a haiku about autumn leaves falling slowly.", "What is 2+2?",
           "Explain photosynthesis to a child in three sentences please.", "Name a color.",
           "Describe the city of Paris and its most famous landmarks in detail.", "Hi", "Why is the sky blue?"]


def run(backend: str, lm: ss.LM, vec: ss.SteeringVector, ids: list[list[int]]) -> dict[str, list[list[int]]]:
    """All cases on one engine with the given executor ("uni" or "mp")."""
    kw = {} if backend == "uni" else {"distributed_executor_backend": backend}
    t = time.time()
    eng = bv.Engine(str(bv.export_folder(lm)), dtype="float32", engine_kwargs=kw).start()
    name = eng.register(vec)
    params = bv.stop_params(lm, 32, False, 1.0, 0)
    res = {pos: eng.generate_ids(ids, [{"vectors": [[name, 1.0]], "positions": pos}] * len(ids), params)[0]
           for pos in ("prompt", "generated", "all")}
    mixed = [None, {"vectors": [[name, 1.0]], "positions": "prompt"}, {"vectors": [[name, -1.0]], "positions": "generated"},
             {"vectors": [[name, 1.5]], "positions": "all"}, None, {"vectors": [[name, 1.0]], "positions": "prompt"},
             {"vectors": [[name, 2.0]], "positions": "generated"}, {"vectors": [[name, -1.0]], "positions": "all"}]
    res["mixed"] = eng.generate_ids(ids, mixed, params)[0]
    print(backend, "started and ran in", round(time.time() - t), "s;", json.dumps(eng.stats())[:300], flush=True)
    eng.close()
    return res


def main(backends: list[str]) -> None:
    lm = ss.load_model("smollm2-135m")
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    vec = ss.SteeringVector({12: v / v.norm() * 4})
    ids = bv.prompt_ids(lm, PROMPTS, templated=True)  # the raw prompts, no chat template (docs/vllm.md)
    a, b = (run(x, lm, vec, ids) for x in backends)
    for case in a:
        same = [sum(x == y for x, y in zip(r1, r2)) for r1, r2 in zip(a[case], b[case])]
        print(case, "equal tokens per row", same, "row lengths", [len(r) for r in a[case]],
              "identical" if a[case] == b[case] else "DIFFERENT")


if __name__ == "__main__":
    main(sys.argv[1:3] or ["uni", "mp"])
