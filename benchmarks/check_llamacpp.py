"""Check steerscope's llama.cpp control-vector interop against llama.cpp itself.

1. Extract a formality DIM vector on SmolLM2-135M-Instruct (resid_pre of block L) and export it
   with ``SteeringVector.export_gguf`` (llama.cpp's ``direction.{L-1}``).
2. Read the exported file the way llama.cpp's ``common_control_vector_load`` does (``direction.N``
   -> buffer offset ``(N-1) * n_embd``; ``direction.0`` is an error there) and hand the buffer to
   ``llama_set_adapter_cvec`` (llama-cpp-python's low-level API) on an F32 GGUF of the same weights.
3. On the same token ids, compare (a) greedy steered tokens, (b) the steering delta of the
   next-token logits (steered - unsteered) against the HF path, and (c) the same delta with the
   HF vector one layer off (the error a wrong layer convention would give).

llama.cpp runs in a worker process (``steerscope.backends.llamacpp``, the same code ``steerscope verify``
uses) under the Python that has ``llama_cpp`` (``--llama-python``, default ``$STEERSCOPE_LLAMACPP`` or this
interpreter), so the HF side can use the main environment. The F32 GGUF is made with llama.cpp's
``convert_hf_to_gguf.py`` (``--convert-script``) and cached by the weights' fingerprint, unless ``--gguf-model``
names one.

Run: ``python benchmarks/check_llamacpp.py --llama-python /tmp/venv-llamacpp/bin/python \
--convert-script /path/to/llama.cpp/convert_hf_to_gguf.py``; ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

PROMPTS = ["Tell me about your weekend.", "Describe the city you live in.", "How do I make tea?",
           "Write a note to a friend.", "What is your favourite food?", "Explain how rain forms."]


def check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import steerscope as ss
    from steerscope.backends import llamacpp
    from steerscope.backends.verify import Plan, cut, eos_ids, hf_deltas, hf_tokens, rel_err
    from steerscope.data import data_path, read_jsonl

    os.environ["LLAMACPP_CONVERT"] = args.convert_script  # where llamacpp.f32_gguf finds the converter
    lm = ss.load_model("smollm2-135m")
    pairs = read_jsonl(data_path("traits", "formality.jsonl"))[:16]
    vec = ss.extract(lm, [p["positive"] for p in pairs], [p["negative"] for p in pairs], layers=[args.layer])
    refused = False
    try:
        ss.SteeringVector({1: vec[args.layer]}).export_gguf(Path(tempfile.gettempdir()) / "never.gguf")
    except ss.SteerscopeError:
        refused = True
    prompts = PROMPTS[:args.n_prompts]
    ids = [lm.tokenize([lm.format_chat(p)])["input_ids"][0].tolist() for p in prompts]
    lc = llamacpp.run(lm, vec, args.alpha, ids, args.n_new, model=Path(args.gguf_model) if args.gguf_model else None,
                      python=Path(args.llama_python))
    plan = Plan("add", "resid_pre", [args.layer], "all", args.alpha, "argument")
    off = ss.SteeringVector({args.layer + 1: vec[args.layer]})  # the HF vector one layer off
    d_hf, d_off = hf_deltas(lm, vec, plan, ids), hf_deltas(lm, off, replace(plan, layers=[args.layer + 1]), ids)
    d_lc = [torch.from_numpy(s - b) for s, b in zip(lc.steered, lc.base)]
    eos = eos_ids(lm)
    same = sum(h == cut(c, eos) for h, c in zip(hf_tokens(lm, vec, plan, ids, args.n_new), lc.tokens))
    return {"model": "smollm2-135m (F32 GGUF)", "layer_resid_pre": args.layer, "alpha": args.alpha,
            "n_prompts": len(prompts), "n_new_tokens": args.n_new, "tokens_identical": same,
            "delta_rel_err": max(rel_err(c, h) for c, h in zip(d_lc, d_hf)),
            "delta_rel_err_off_by_one": min(float((o - c).norm() / h.norm()) for o, c, h in zip(d_off, d_lc, d_hf)),
            "direction0_refused": refused}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-python", default=os.environ.get("STEERSCOPE_LLAMACPP") or sys.executable)
    p.add_argument("--convert-script", default=os.environ.get("LLAMACPP_CONVERT", "convert_hf_to_gguf.py"))
    p.add_argument("--gguf-model", default=os.environ.get("STEERSCOPE_F32_GGUF"))
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--n-prompts", type=int, default=6)
    p.add_argument("--n-new", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="3 prompts, 16 tokens")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.n_prompts, a.n_new = 3, 16
    rep = check(a)
    if a.json:
        print(json.dumps(rep))
    else:
        for k, v in rep.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
