"""llama.cpp control vectors, run by llama.cpp itself: the steerscope side of the llama.cpp worker.

llama.cpp (llama-cpp-python) usually lives in its own environment, so the work happens in a worker process,
``engine/steerscope_llamacpp_worker.py``, under the Python that has ``llama_cpp`` (``$STEERSCOPE_LLAMACPP``, or
this interpreter when it has the package). This side:

1. makes an F32 GGUF of the LM's weights with llama.cpp's own ``convert_hf_to_gguf.py`` (``$LLAMACPP_CONVERT``),
   cached under steerscope's cache folder by the weights' fingerprint (:func:`f32_gguf`);
2. exports the vector with :meth:`SteeringVector.export_gguf` and builds the buffer llama.cpp's
   ``common_control_vector_load`` builds from that file (:func:`cvec_buffer`: ``direction.N`` at offset
   ``(N-1) * n_embd``, scaled by the strength);
3. hands token ids made by the LM's own tokenizer to the worker and reads back greedy tokens and the
   next-token logits with and without the control vector (:func:`run`).

llama.cpp adds a control vector to the output of block N (``direction.N``, N >= 1) at every position: additive
steering of the residual stream only (:func:`refusal` says what else is refused).
Used by ``steerscope verify`` and ``benchmarks/check_llamacpp.py``.

Example:
    >>> out = run(lm, vec, alpha=4.0, ids=[[1, 2, 3]], n_new=8)
    >>> out.tokens[0], out.steered[0] - out.base[0]   # greedy tokens, steering delta of the logits [vocab]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from steerscope.errors import BackendError
from steerscope.models.lm import LM
from steerscope.models.load import cache_dir
from steerscope.vector import SteeringVector

WORKER = Path(__file__).resolve().parent / "engine" / "steerscope_llamacpp_worker.py"
VERSION = "0.3.36"  # the llama-cpp-python release .ci/llamacpp.sh installs
INSTALL = (f"python -m venv ~/.cache/steerscope/llamacpp-env && ~/.cache/steerscope/llamacpp-env/bin/pip install "
           f"llama-cpp-python=={VERSION}, then set STEERSCOPE_LLAMACPP=~/.cache/steerscope/llamacpp-env/bin/python "
           "and LLAMACPP_CONVERT=<llama.cpp>/convert_hf_to_gguf.py (see .ci/llamacpp.sh)")


def llama_python() -> Path | None:
    """The Python with ``llama_cpp``: ``$STEERSCOPE_LLAMACPP`` when set (None if it cannot import llama_cpp),
    else this interpreter when it has the package, else None."""
    env = os.environ.get("STEERSCOPE_LLAMACPP")
    if not env:
        return Path(sys.executable) if importlib.util.find_spec("llama_cpp") is not None else None
    py = Path(env).expanduser()
    if not py.is_file():
        return None
    ok = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0
    return py if ok else None


def convert_script() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py`` (``$LLAMACPP_CONVERT``), or None when it is not set or absent."""
    env = os.environ.get("LLAMACPP_CONVERT")
    return Path(env).expanduser() if env and Path(env).expanduser().is_file() else None


def missing(lm: LM | None = None) -> str | None:
    """Why llama.cpp cannot run ``lm`` here (with the install command), or None when it can (without ``lm``:
    whether llama.cpp and its converter are there)."""
    if llama_python() is None:
        return f"llama-cpp-python not found; install it: {INSTALL}"
    if convert_script() is None and (lm is None or not gguf_path(lm).is_file()):
        return f"no LLAMACPP_CONVERT (llama.cpp's convert_hf_to_gguf.py) to make the F32 GGUF; {INSTALL}"
    return None


def gguf_path(lm: LM) -> Path:
    """Where the F32 GGUF of ``lm``'s weights is cached (keyed by name and weights fingerprint)."""
    key = hashlib.sha256(f"{lm.name}:{lm.fingerprint}".encode()).hexdigest()[:16]
    return cache_dir() / "llamacpp-models" / f"{key}-f32.gguf"


def f32_gguf(lm: LM) -> Path:
    """An F32 GGUF of ``lm``'s weights, made once by llama.cpp's converter and cached by fingerprint.

    Raises:
        BackendError: no cached file and no ``$LLAMACPP_CONVERT``, or the converter failed.
    """
    from steerscope.backends.vllm import export_folder  # the same safetensors export the vLLM engine loads

    out = gguf_path(lm)
    if out.is_file():
        return out
    script = convert_script()
    if script is None:
        raise BackendError(f"no F32 GGUF of {lm.name} cached and no converter: {INSTALL}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = subprocess.run([sys.executable, str(script), str(export_folder(lm)), "--outtype", "f32", "--outfile",
                          str(tmp)], capture_output=True, text=True)
    if res.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise BackendError(f"llama.cpp's converter failed on {lm.name}: {' '.join(res.stderr.split()[-40:])}")
    tmp.replace(out)
    return out


def cvec_buffer(gguf_path: str | Path, n_embd: int, strength: float) -> np.ndarray:
    """The buffer llama.cpp's ``common_control_vector_load`` builds from a control-vector file:
    ``strength * direction.N`` at offset ``(N-1) * n_embd`` (float32 [N_max * n_embd]).

    Raises:
        BackendError: the file has ``direction.0``, which llama.cpp rejects (it then drops the whole file).
    """
    import gguf

    data = np.zeros(0, np.float32)
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        n = int(t.name.split(".")[1])
        if n == 0:
            raise BackendError(f"{gguf_path} has direction.0: llama.cpp would reject the whole file")
        if data.size < n * n_embd:
            data = np.concatenate([data, np.zeros(n * n_embd - data.size, np.float32)])
        data[(n - 1) * n_embd:n * n_embd] += strength * np.asarray(t.data, np.float32).reshape(-1)
    return data


def control_buffer(vector: SteeringVector, n_embd: int, strength: float) -> np.ndarray:
    """``vector`` exported as a llama.cpp control vector (:meth:`SteeringVector.export_gguf`) and read back as
    llama.cpp reads it (:func:`cvec_buffer`)."""
    with tempfile.TemporaryDirectory(prefix="steerscope-cvec-") as d:
        return cvec_buffer(vector.export_gguf(Path(d) / "cv.gguf"), n_embd, strength)


def refusal(operation: str, site: str, layers: Sequence[int], positions: Any) -> str | None:
    """Why llama.cpp cannot honour this use of a vector (one line), or None when it can.

    llama.cpp control vectors add to the output of blocks 1.. (resid_post N = resid_pre N+1) at every position.
    """
    if operation != "add":
        return f"llama.cpp control vectors only add; this file's operation is {operation}"
    if site not in ("resid_pre", "resid_post"):
        return f"llama.cpp control vectors add to the residual stream between blocks; this file's site is {site}"
    if positions != "all":
        return f"llama.cpp control vectors apply at every position; this file's positions are {positions}"
    low = [k for k in layers if k - (1 if site == "resid_pre" else 0) < 1]
    if low:
        return (f"{site} layer(s) {low} map to llama.cpp direction.0 or below, which llama.cpp cannot steer "
                "(it adds to the outputs of blocks 1 and up)")
    return None


@dataclass(frozen=True)
class LlamaRun:
    """What the worker returned: ``tokens`` (greedy, steered, not cut at EOS) per prompt, and the next-token
    logits without (``base``) and with (``steered``) the control vector, float32 [prompt vocab]."""

    tokens: list[list[int]]
    base: np.ndarray
    steered: np.ndarray
    n_layer: int


def run(lm: LM, vector: SteeringVector, alpha: float, ids: Sequence[Sequence[int]], n_new: int,
        model: Path | None = None, python: Path | None = None) -> LlamaRun:
    """Steer ``lm``'s weights in llama.cpp with ``alpha * vector`` as a control vector (see the module docstring).

    Args:
        lm: the model (its F32 GGUF is made or reused, unless ``model`` names one).
        vector: a resid_pre / resid_post vector (exported with :meth:`SteeringVector.export_gguf`).
        alpha: the control vector's strength.
        ids: prompt token ids, made by ``lm``'s tokenizer.
        n_new: greedy tokens per prompt.
        model: an F32 GGUF of the same weights (default: :func:`f32_gguf`).
        python: the Python with llama_cpp (default: :func:`llama_python`).
    """
    py = python or llama_python()
    if py is None:
        raise BackendError(f"llama-cpp-python not found; install it: {INSTALL}")
    buf = control_buffer(vector, lm.d_model, alpha)
    with tempfile.TemporaryDirectory(prefix="steerscope-llamacpp-") as d:
        job = {"model": str(model or f32_gguf(lm)), "cvec": buf.tolist(), "ids": [list(map(int, r)) for r in ids],
               "n_new": int(n_new), "logits": str(Path(d) / "logits.npz")}
        (Path(d) / "job.json").write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        res = subprocess.run([str(py), str(WORKER), str(Path(d) / "job.json")], capture_output=True, text=True,
                             env=env)
        if res.returncode != 0:
            raise BackendError(f"the llama.cpp worker failed: {' '.join(res.stderr.split()[-60:])}")
        reply = json.loads(res.stdout.strip().splitlines()[-1])
        with np.load(job["logits"], allow_pickle=False) as z:
            base, steered = z["base"], z["steered"]
    return LlamaRun([r["tokens"] for r in reply["rows"]], base, steered, int(reply["n_layer"]))
