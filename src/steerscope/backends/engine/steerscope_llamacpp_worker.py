"""The llama.cpp worker behind ``steerscope verify`` and ``benchmarks/check_llamacpp.py`` (llama.cpp environment).

Started by :mod:`steerscope.backends.llamacpp` as ``python steerscope_llamacpp_worker.py JOB_JSON`` under the
Python that has ``llama_cpp`` (llama-cpp-python); it imports only llama_cpp and numpy, never steerscope.

1. Load the F32 GGUF model ``job["model"]`` with llama-cpp-python's low-level API.
2. For each prompt (token ids made by the steerscope side, so both sides read the same tokens): decode it
   without a control vector and keep the next-token logits; decode it again with the control-vector buffer
   ``job["cvec"]`` set by ``llama_set_adapter_cvec`` (``direction.N`` at offset ``(N-1) * n_embd``, the layout
   llama.cpp's ``common_control_vector_load`` builds) and keep the next-token logits and ``job["n_new"]``
   greedy tokens (no stop at EOS: the caller cuts).
3. Write the logits to ``job["logits"]`` (an ``.npz`` of ``base`` and ``steered``, [prompt vocab]) and print one
   JSON line ``{"n_embd", "n_layer", "rows": [{"tokens": [...]}, ...]}`` on stdout.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path
from typing import Any


def _logits(L: Any, ctx: Any, n_vocab: int) -> Any:
    import numpy as np

    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def _run(L: Any, model: Any, ids: list[int], buf: Any, n_new: int, n_vocab: int) -> tuple[Any, list[int]]:
    """(next-token logits [vocab] after the prompt, ``n_new`` greedy tokens); steered when ``buf`` is given."""
    import numpy as np

    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = max(512, len(ids) + n_new + 8)
    cp.n_threads = cp.n_threads_batch = 1
    ctx = L.llama_init_from_model(model, cp)
    try:
        if buf is not None:
            set_cvec = getattr(L, "llama_set_adapter_cvec", None) or L.llama_apply_adapter_cvec
            ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            n_embd, n_layer = L.llama_model_n_embd(model), L.llama_model_n_layer(model)
            if set_cvec(ctx, ptr, buf.size, n_embd, 1, n_layer) != 0:
                raise RuntimeError("llama_set_adapter_cvec refused the control vector")
        toks = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(toks, len(ids))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        first = logits = _logits(L, ctx, n_vocab)
        out: list[int] = []
        for _ in range(n_new):
            t = int(np.argmax(logits))
            out.append(t)
            one = (L.llama_token * 1)(t)
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed on a generated token")
            logits = _logits(L, ctx, n_vocab)
        return first, out
    finally:
        L.llama_free(ctx)


def work(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job (see the module docstring); returns the JSON reply."""
    import llama_cpp as L
    import numpy as np

    L.llama_backend_init()
    model = L.llama_model_load_from_file(job["model"].encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp cannot load {job['model']}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    buf = np.asarray(job["cvec"], dtype=np.float32)
    base, steered, rows = [], [], []
    for ids in job["ids"]:
        b, _ = _run(L, model, ids, None, 0, n_vocab)
        s, toks = _run(L, model, ids, buf, job["n_new"], n_vocab)
        base.append(b)
        steered.append(s)
        rows.append({"tokens": toks})
    reply = {"n_embd": L.llama_model_n_embd(model), "n_layer": L.llama_model_n_layer(model), "rows": rows}
    L.llama_model_free(model)
    np.savez(job["logits"], base=np.stack(base), steered=np.stack(steered))
    return reply


if __name__ == "__main__":
    print(json.dumps(work(json.loads(Path(sys.argv[1]).read_text()))))
