"""vLLM steering throughput, from one run: steered vs unsteered, per-request vectors vs one vector,
vLLM vs HF steered generation, and peers (nnsight through its tracer; llama.cpp control vectors).

32 prompts x 64 new tokens (EOS ignored, so every configuration generates the same 2048 tokens),
SmolLM2-135M fp32 on CPU, a norm-8 vector at layer 12 (alpha 1). The vLLM configurations run
interleaved ``--repeats`` times in one engine; each ratio is computed within a round and the
median over rounds reported, with the load average (``uptime``) taken before each timing. Peers run
in their own venvs: ``--nnsight-python`` (a venv with nnsight 0.8) and ``--llama-python`` (with
llama-cpp-python, default ``$STEERSCOPE_LLAMACPP``); a missing peer is reported as missing. llama.cpp
runs an F32 GGUF of the same weights (``--gguf-model``, else made by llama.cpp's
``convert_hf_to_gguf.py``, ``--convert-script``) on the same prompt token ids, one sequence at a
time (llama-cpp-python has no batched generate), with the vector as a control vector
(``llama_set_adapter_cvec``, the buffer ``--control-vector-scaled`` builds).

``--compiled`` times the same three configurations on vLLM's compiled engine too (torch.compile with the
graph-safe steering buffers), after the eager one, each in its own engine. Every run also measures this
machine's fp32 matmul rate with torch (GFLOP/s, at the start and the end) and reports each engine row as a
fraction of it (tokens/s x 2 x parameters / matmul rate): how far from the compute limit the engine runs.
``--skip-hf --skip-peers`` leaves only the engine rows.

Run:
    STEERSCOPE_VLLM_ENV=... python benchmarks/bench_vllm.py --json > bench_vllm.json
    STEERSCOPE_VLLM_ENV=... python benchmarks/bench_vllm.py --compiled --skip-hf --skip-peers --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import steerscope as ss
from steerscope.backends import vllm as bv

TOPICS = ["rain", "bread", "the sea", "chess", "trains", "owls", "tea", "winter", "music", "maps", "bees", "glass",
          "rivers", "clocks", "salt", "paper", "bridges", "gardens", "wolves", "copper", "deserts", "kites", "honey",
          "stone", "lamps", "snow", "violins", "forests", "ink", "islands", "wheat", "mirrors"]
PROMPTS = [f"Write a short paragraph about {t}." for t in TOPICS]
# nnsight's steered generate (one script for this file and bench_hf.py): rows run to ``n`` tokens when the job
# says ``"fixed_length"`` (equal work steered or not), else stop at EOS as ``ss.generate`` does
NNSIGHT = r'''
import json, sys, time, torch
from nnsight import LanguageModel
cfg = json.loads(open(sys.argv[1]).read()); torch.set_num_threads(cfg["threads"])
model = LanguageModel(cfg["folder"], dispatch=True, dtype=torch.float32)
tok = model.tokenizer; tok.padding_side = "left"
vec = torch.tensor(cfg["vec"])
texts = cfg["texts"]
fixed = {"min_new_tokens": cfg["n"]} if cfg.get("fixed_length") else {}
res = {}
for steer in (False, True):  # module level: nnsight binds saved values in this frame
    t = time.perf_counter()
    with model.generate(texts, max_new_tokens=cfg["n"], do_sample=False, pad_token_id=tok.pad_token_id,
                        **fixed) as tracer:
        if steer:  # resid_pre of layer L = output of layer L-1, every generation step (bounded iter)
            for step in tracer.iter[0:cfg["n"]]:
                model.model.layers[cfg["layer"] - 1].output[:] += vec
        ids = tracer.result.save()
    res[steer] = (time.perf_counter() - t, ids.tolist())
(tu, iu), (ts, is_) = res[False], res[True]
n_in = len(tok(texts, padding=True, add_special_tokens=False)["input_ids"][0])
print(json.dumps({"unsteered": tu, "steered": ts, "rows_changed_by_steering": sum(a != b for a, b in zip(iu, is_)),
                  **{"texts_" + k: tok.batch_decode([r[n_in:] for r in rows], skip_special_tokens=True)
                     for k, rows in (("unsteered", iu), ("steered", is_))}}))
'''

LLAMA = r'''
import ctypes, json, sys, time
import numpy as np
import llama_cpp as L
cfg = json.loads(open(sys.argv[1]).read())
L.llama_backend_init()
model = L.llama_model_load_from_file(cfg["model"].encode(), L.llama_model_default_params())
n_embd, n_layer = L.llama_model_n_embd(model), L.llama_model_n_layer(model)
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
buf = np.asarray(cfg["cvec"], dtype=np.float32)
set_cvec = getattr(L, "llama_set_adapter_cvec", None) or L.llama_apply_adapter_cvec
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 512, 512, cfg["threads"], cfg["threads"]
ctx = L.llama_init_from_model(model, cp)
def generate(ids, n):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    toks = (L.llama_token * len(ids))(*ids)
    assert L.llama_decode(ctx, L.llama_batch_get_one(toks, len(ids))) == 0
    out = []
    for _ in range(n):
        t = int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))
        out.append(t)
        assert L.llama_decode(ctx, L.llama_batch_get_one((L.llama_token * 1)(t), 1)) == 0
    return out
res = {}
generate(cfg["ids"][0], 4)  # warm-up
for steer in (False, True):
    if steer:
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert set_cvec(ctx, ptr, buf.size, n_embd, 1, n_layer) == 0
    t = time.perf_counter()
    rows = [generate(ids, cfg["n"]) for ids in cfg["ids"]]
    res[steer] = (time.perf_counter() - t, rows)
(tu, iu), (ts, is_) = res[False], res[True]
print(json.dumps({"unsteered": tu, "steered": ts, "rows_changed_by_steering": sum(a != b for a, b in zip(iu, is_)),
                  "threads": cfg["threads"]}))
'''


def llama_cfg(lm: ss.LM, texts: list[str], vec: ss.SteeringVector, a: argparse.Namespace) -> dict:
    """The llama.cpp peer's job: F32 GGUF, prompt ids, the control-vector buffer of ``vec`` at alpha 1."""
    from check_llamacpp import cvec_buffer
    from steerscope.models.load import ALIASES, _gguf_to_folder

    gguf_model = Path(a.gguf_model or Path(tempfile.gettempdir()) / "steerscope-smollm2-135m-f32.gguf")
    if not gguf_model.is_file():
        folder = _gguf_to_folder(ALIASES["smollm2-135m"].gguf())
        subprocess.run([sys.executable, a.convert_script, str(folder), "--outtype", "f32", "--outfile",
                        str(gguf_model)], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as d:
        buf = cvec_buffer(vec.export_gguf(Path(d) / "cv.gguf"), lm.d_model, 1.0)
    ids = [lm.tokenize([t])["input_ids"][0].tolist() for t in texts]
    return {"model": str(gguf_model), "ids": ids, "cvec": buf, "n": a.new_tokens, "threads": torch.get_num_threads()}


def load() -> float:
    return os.getloadavg()[0]


def hf_time(lm: ss.LM, texts: list[str], vec: ss.SteeringVector | None, n: int) -> float:
    batch = lm.tokenize(texts)
    t = time.perf_counter()
    ctx = ss.steering(lm, vec, 1.0) if vec is not None else torch.no_grad()
    with ctx, torch.no_grad():
        lm.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id)
    return time.perf_counter() - t


def matmul_gflops(seconds: float = 3.0, size: int = 1024) -> float:
    """This machine's fp32 matmul rate with torch's threads (GFLOP/s, best of ~``seconds`` of 1024^3 products):
    the compute-limit anchor for every engine row (tokens/s x 2 x parameters / this)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def vllm_rounds(lm: ss.LM, texts: list[str], vec: ss.SteeringVector, n: int, repeats: int,
                compiled: bool = False) -> list[dict]:
    eng = bv.engine_for(lm, compiled=compiled)
    ids = bv.prompt_ids(lm, texts, True)
    params = {"max_tokens": n, "temperature": 0.0, "stop_token_ids": [], "ignore_eos": True}
    g = torch.Generator().manual_seed(1)
    others = [ss.SteeringVector({12: 8 * (v := torch.randn(lm.d_model, generator=g)) / v.norm()})
              for _ in texts]
    same = bv.spec(eng, vec, 1.0)
    per = [bv.spec(eng, v, 1.0) for v in others]
    configs = {"unsteered": [None] * len(ids), "steered": [same] * len(ids), "per_request": per}
    eng.generate_ids(ids[:4], [None] * 4, {**params, "max_tokens": 4})  # warm-up
    rounds = []
    for _ in range(repeats):
        r = {}
        for name, specs in configs.items():
            r[f"load_{name}"] = load()
            _, r[name] = eng.generate_ids(ids, specs, params)
        rounds.append(r)
    return rounds


def peer(python: str | None, script: str, cfg: dict) -> dict | str:
    """Run a peer's script under its own Python; the job travels as a JSON file (argv[1])."""
    if not python or not Path(python).is_file():
        return "not available (no venv given or found)"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as j:
        json.dump(cfg, j)
    t = time.time()
    res = subprocess.run([python, f.name, j.name], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        return "failed: " + res.stderr.strip().splitlines()[-1][:300] if res.stderr.strip() else "failed"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_incl_load"] = time.time() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--nnsight-python", default="/tmp/venv-nnsight/bin/python")
    ap.add_argument("--llama-python", default=os.environ.get("STEERSCOPE_LLAMACPP"))
    ap.add_argument("--gguf-model", default=os.environ.get("STEERSCOPE_F32_GGUF"))
    ap.add_argument("--convert-script", default=os.environ.get("LLAMACPP_CONVERT", "convert_hf_to_gguf.py"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compiled", action="store_true", help="also time vLLM's compiled engine (graph-safe steering)")
    ap.add_argument("--skip-peers", action="store_true", help="no nnsight / llama.cpp rows")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    n = a.new_tokens
    lm = ss.load_model("smollm2-135m")
    texts = [lm.format_chat(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    vec = ss.SteeringVector({12: 8 * (v := torch.randn(lm.d_model, generator=g)) / v.norm()})
    res: dict = {"prompts": len(texts), "new_tokens": n, "threads": torch.get_num_threads(), "load_start": load()}
    res["matmul_gflops"] = matmul_gflops()
    params = sum(p.numel() for p in lm.model.parameters())
    res["parameters"] = params
    tok = len(texts) * n
    for mode in ("eager", "compiled") if a.compiled else ("eager",):
        rounds = vllm_rounds(lm, texts, vec, n, a.repeats, compiled=mode == "compiled")
        pre = "vllm" if mode == "eager" else "vllm_compiled"
        res[f"{pre}_rounds"] = rounds
        res[f"{pre}_tok_s"] = {k: tok / statistics.median(r[k] for r in rounds)
                               for k in ("unsteered", "steered", "per_request")}
        res[f"{pre}_compute_fraction"] = {k: v * 2 * params / (res["matmul_gflops"] * 1e9)
                                          for k, v in res[f"{pre}_tok_s"].items()}
        for name, num, den in (("steer_overhead_pct", "steered", "unsteered"),
                               ("per_request_vs_same_pct", "per_request", "steered")):
            xs = [100 * (r[num] / r[den] - 1) for r in rounds]
            res[f"{pre}_{name}" if mode == "compiled" else name] = statistics.median(xs)
            res[f"{pre}_{name}_range"] = [min(xs), max(xs)]
        bv.close_engines()
    if a.compiled:
        res["compiled_vs_eager_tok_s"] = {k: res["vllm_compiled_tok_s"][k] / res["vllm_tok_s"][k]
                                          for k in ("unsteered", "steered", "per_request")}
    res["matmul_gflops_end"] = matmul_gflops()
    if not a.skip_hf:
        res["load_hf"] = load()
        res["hf_steered_s"] = hf_time(lm, texts, vec, n)
        res["hf_unsteered_s"] = hf_time(lm, texts, None, n)
        res["hf_tok_s_steered"] = tok / res["hf_steered_s"]
        res["vllm_vs_hf_steered_speedup"] = res["vllm_tok_s"]["steered"] / res["hf_tok_s_steered"]
    if a.skip_peers:
        print(json.dumps(res, indent=None if a.json else 2))
        return
    res["load_nnsight"] = load()
    res["nnsight"] = peer(a.nnsight_python, NNSIGHT, {"folder": str(bv.export_folder(lm)), "texts": texts, "n": n,
                                                      "fixed_length": True, "layer": 12, "vec": vec[12].tolist(),
                                                      "threads": torch.get_num_threads()})
    res["load_llama_cpp"] = load()
    res["llama_cpp"] = (peer(a.llama_python, LLAMA, llama_cfg(lm, texts, vec, a)) if a.llama_python
                        else "not available (no --llama-python / STEERSCOPE_LLAMACPP)")
    if isinstance(res["llama_cpp"], dict):
        lc = res["llama_cpp"]
        lc["tok_s_unsteered"], lc["tok_s_steered"] = tok / lc["unsteered"], tok / lc["steered"]
        lc["steer_overhead_pct"] = 100 * (lc["steered"] / lc["unsteered"] - 1)
    res["load_end"] = load()
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    sys.exit(main())
