"""The offline engine process behind ``ss.generate(..., backend="vllm")`` (engine environment).

Started by :mod:`steerscope.backends.vllm` as ``python steerscope_vllm_engine.py CONFIG_JSON``.
Protocol: one JSON object per line on stdin, one JSON reply per line on the original stdout
(vLLM's own logs go to stderr). Vectors travel as safetensors files named in ``register``.
Ops: ``register {name, path}``, ``generate {prompts: [{ids, steer}], params}`` (``params.seeds``: one
sampling seed per prompt, else ``params.seed`` for all), ``stats``, ``quit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
import uuid
from typing import Any


def _salt(spec: Any, unique: bool = False) -> str | None:
    """Prefix-cache salt per steering configuration (KV computed under one vector is never reused by another).

    ``unique``: a salt of its own (a gated request: its gate must read every prompt token, so no prefix of its
    prompt may come from the cache)."""
    if spec is None:
        return None
    key = json.dumps(spec, sort_keys=True) + (uuid.uuid4().hex if unique else "")
    return "steerscope-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything vLLM prints goes to stderr
    cfg = json.loads(sys.argv[1])

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")

    from steerscope_vllm_adapter import check_version, parse_spec
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    check_version()
    kwargs = dict(cfg.get("engine_kwargs", {}))
    if kwargs.get("tensor_parallel_size", 1) == 1 and kwargs.get("pipeline_parallel_size", 1) == 1:
        kwargs.setdefault("distributed_executor_backend", "uni")  # worker in the engine process: one import less
    # compiled: vLLM's default compilation, steered through the graph-safe buffers that steerscope_vllm_plugin
    # builds into the model ($STEERSCOPE_VLLM_GRAPH, set by the launcher); else eager with hooks
    llm = LLM(model=cfg["model"], dtype=cfg.get("dtype", "float32"), enforce_eager=not cfg.get("compiled", False),
              seed=cfg.get("seed", 0),
              worker_extension_cls="steerscope_vllm_adapter.SteerExtension",
              enable_prefix_caching=cfg.get("prefix_caching", True), **kwargs)
    info = llm.collective_rpc("steerscope_install")[0]
    known: set[str] = set()
    reply({"ok": True, "op": "ready", **info})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                reply({"ok": True})
                break
            if op == "register":
                layers = llm.collective_rpc("steerscope_register", args=(req["name"], req["path"]))[0]
                known.add(req["name"])
                reply({"ok": True, "layers": layers})
            elif op == "stats":
                ranks = llm.collective_rpc("steerscope_stats")  # one per worker (tensor / pipeline parallel ranks)
                reply({"ok": True, **ranks[0], "ranks": ranks})
            elif op == "generate":
                check = parse_spec if not cfg.get("compiled") else _graph_only(parse_spec)
                reply(_generate(llm, req, known, check, SamplingParams, TokensPrompt))
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as e:  # report, keep serving
            reply({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})


def _graph_only(parse_spec: Any) -> Any:
    """``parse_spec`` that also refuses the gated specs a compiled graph cannot run (``compiled_refusal``)."""
    from steerscope_vllm_gates import compiled_refusal
    from steerscope_vllm_plugin import wanted

    gate_sites = wanted()[2]

    def parse(raw: Any, known: set[str]) -> Any:
        spec = parse_spec(raw, known)
        why = compiled_refusal(spec, gate_sites)
        if why:
            raise ValueError(why)
        return spec
    return parse


def _generate(llm: Any, req: dict[str, Any], known: set[str], parse_spec: Any, SamplingParams: Any,
              TokensPrompt: Any) -> dict[str, Any]:
    p = req["params"]
    seeds = p.get("seeds")  # one per prompt (else p["seed"] for all of them)
    if seeds is not None and len(seeds) != len(req["prompts"]):
        raise ValueError(f"{len(seeds)} seeds for {len(req['prompts'])} prompts")
    prompts, sps = [], []
    for i, item in enumerate(req["prompts"]):
        spec = item.get("steer")
        parsed = parse_spec(spec, known)  # ValueError before anything reaches the engine
        salt = _salt(spec, unique=parsed is not None and parsed.gated)
        prompts.append(TokensPrompt(prompt_token_ids=item["ids"], **({"cache_salt": salt} if salt else {})))
        seed = p.get("seed") if seeds is None else int(seeds[i])
        sps.append(SamplingParams(max_tokens=p["max_tokens"], temperature=p.get("temperature", 0.0),
                                  top_p=p.get("top_p", 1.0), top_k=p.get("top_k", 0),
                                  seed=seed, stop_token_ids=p.get("stop_token_ids") or None,
                                  ignore_eos=p.get("ignore_eos", False), skip_special_tokens=True,
                                  extra_args={"steerscope": spec} if spec else None))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    return {"ok": True, "tokens": [list(o.outputs[0].token_ids) for o in outs], "seconds": dt}


if __name__ == "__main__":
    main()
