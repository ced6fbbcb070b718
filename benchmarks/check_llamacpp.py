"""Check steerscope's llama.cpp control-vector interop against llama.cpp itself.

1. Extract a formality DIM vector on SmolLM2-135M-Instruct (resid_pre of block L) and export it
   with ``SteeringVector.export_gguf`` (llama.cpp's ``direction.{L-1}``).
2. Read the exported file the way llama.cpp's ``common_control_vector_load`` does (``direction.N``
   -> buffer offset ``(N-1) * n_embd``; ``direction.0`` is an error there) and hand the buffer to
   ``llama_set_adapter_cvec`` (llama-cpp-python's low-level API) on an F32 GGUF of the same weights.
3. On the same token ids, compare (a) greedy steered tokens, (b) the steering delta of the
   next-token logits (steered - unsteered) against the HF path, and (c) the same delta with the
   HF vector one layer off (the error a wrong layer convention would give).

llama.cpp runs in a worker process (``--worker``) under the Python that has ``llama_cpp``
(``--llama-python``, default ``$STEERSCOPE_LLAMACPP`` or this interpreter), so the HF side can use
the main environment. The F32 GGUF is made with llama.cpp's ``convert_hf_to_gguf.py``
(``--convert-script``) unless ``--gguf-model`` names one.

Run: ``python benchmarks/check_llamacpp.py --llama-python /tmp/venv-llamacpp/bin/python \
--convert-script /path/to/llama.cpp/convert_hf_to_gguf.py``; ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPTS = ["Tell me about your weekend.", "Describe the city you live in.", "How do I make tea?",
           "Write a note to a friend.", "What is your favourite food?", "Explain how rain forms."]


# -- llama.cpp worker (needs only llama_cpp and numpy) ---------------------------------------------
def worker(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(job["model"].encode(), mp)
    n_embd, n_layer = L.llama_model_n_embd(model), L.llama_model_n_layer(model)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    set_cvec = getattr(L, "llama_set_adapter_cvec", None) or L.llama_apply_adapter_cvec
    buf = np.asarray(job["cvec"], dtype=np.float32)

    def run(ids: list[int], steer: bool, n_new: int) -> tuple[list[float], list[int]]:
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 512, 512, 1, 1
        ctx = L.llama_init_from_model(model, cp)
        try:
            if steer:
                ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                assert set_cvec(ctx, ptr, buf.size, n_embd, 1, n_layer) == 0
            toks = (L.llama_token * len(ids))(*ids)
            assert L.llama_decode(ctx, L.llama_batch_get_one(toks, len(ids))) == 0
            first = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
            out: list[int] = []
            logits = first
            for _ in range(n_new):
                t = int(np.argmax(logits))
                out.append(t)
                one = (L.llama_token * 1)(t)
                assert L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) == 0
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
            return first.tolist(), out
        finally:
            L.llama_free(ctx)

    rows = []
    for ids in job["ids"]:
        base, _ = run(ids, False, 0)
        steered, toks = run(ids, True, job["n_new"])
        rows.append({"base": base, "steered": steered, "tokens": toks})
    L.llama_model_free(model)
    return {"n_embd": n_embd, "n_layer": n_layer, "rows": rows}


# -- HF side -----------------------------------------------------------------------------------
def cvec_buffer(gguf_path: Path, n_embd: int, strength: float) -> list[float]:
    """The buffer llama.cpp's common_control_vector_load builds from a control-vector file."""
    import gguf
    import numpy as np

    data = np.zeros(0, np.float32)
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        n = int(t.name.split(".")[1])
        if n == 0:
            raise SystemExit("direction.0 in the exported file: llama.cpp would reject the whole file")
        if data.size < n * n_embd:
            data = np.concatenate([data, np.zeros(n * n_embd - data.size, np.float32)])
        data[(n - 1) * n_embd:n * n_embd] += strength * np.asarray(t.data, np.float32).reshape(-1)
    return data.tolist()


def hf_side(lm: Any, vec: Any, alpha: float, ids: list[list[int]], n_new: int, off: Any) -> list[dict[str, Any]]:
    import torch

    import steerscope as ss

    rows = []
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            base = lm.model(input_ids=x).logits[0, -1]
            with ss.steering(lm, vec, alpha=alpha):
                steered = lm.model(input_ids=x).logits[0, -1]
                gen = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                        do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
            with ss.steering(lm, off, alpha=alpha):
                steered_off = lm.model(input_ids=x).logits[0, -1]
        rows.append({"base": base, "steered": steered, "off": steered_off, "tokens": gen[0, len(row):].tolist()})
    return rows


def check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import steerscope as ss
    from steerscope.data import data_path, read_jsonl
    from steerscope.models.load import ALIASES, _gguf_to_folder

    lm = ss.load_model("smollm2-135m")
    gguf_model = Path(args.gguf_model) if args.gguf_model else None
    if gguf_model is None:
        gguf_model = Path(tempfile.gettempdir()) / "steerscope-smollm2-135m-f32.gguf"
        if not gguf_model.is_file():
            folder = _gguf_to_folder(ALIASES["smollm2-135m"].gguf())
            subprocess.run([sys.executable, args.convert_script, str(folder), "--outtype", "f32", "--outfile",
                            str(gguf_model)], check=True, capture_output=True)
    pairs = read_jsonl(data_path("traits", "formality.jsonl"))[:16]
    vec = ss.extract(lm, [p["positive"] for p in pairs], [p["negative"] for p in pairs], layers=[args.layer])
    refused = False
    try:
        ss.SteeringVector({1: vec[args.layer]}).export_gguf(Path(tempfile.gettempdir()) / "never.gguf")
    except ss.SteerscopeError:
        refused = True
    with tempfile.TemporaryDirectory() as d:
        cv = vec.export_gguf(Path(d) / "cv.gguf")
        buf = cvec_buffer(cv, lm.d_model, args.alpha)
    prompts = PROMPTS[:args.n_prompts]
    ids = [lm.tokenize([lm.format_chat(p)])["input_ids"][0].tolist() for p in prompts]
    job = {"model": str(gguf_model), "cvec": buf, "ids": ids, "n_new": args.n_new}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    res = subprocess.run([args.llama_python, __file__, "--worker", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if res.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed: {res.stderr[-1500:]}")
    lc = json.loads(res.stdout.strip().splitlines()[-1])
    off = ss.SteeringVector({args.layer + 1: vec[args.layer]})
    hf = hf_side(lm, vec, args.alpha, ids, args.n_new, off)
    errs, errs_off, same = [], [], 0
    for h, c in zip(hf, lc["rows"]):
        d_hf = h["steered"] - h["base"]
        d_lc = torch.tensor(c["steered"]) - torch.tensor(c["base"])
        errs.append(float((d_hf - d_lc).norm() / d_hf.norm()))
        errs_off.append(float((h["off"] - h["base"] - d_lc).norm() / d_hf.norm()))
        same += int(h["tokens"] == c["tokens"])
    return {"model": "smollm2-135m (F32 GGUF)", "layer_resid_pre": args.layer, "alpha": args.alpha,
            "n_prompts": len(prompts), "n_new_tokens": args.n_new, "tokens_identical": same,
            "delta_rel_err": max(errs), "delta_rel_err_off_by_one": min(errs_off), "direction0_refused": refused}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
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
    if a.worker:
        print(json.dumps(worker(json.loads(Path(a.worker).read_text()))))
        return
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
