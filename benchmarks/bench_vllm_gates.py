"""Overhead of per-request conditions on the eager vLLM engine (issue 24, section 3). Figures: README and docs/conditional.md.

Four configurations on one engine, 32 prompts x 64 new tokens (EOS ignored, so each generates 2048 tokens),
SmolLM2-135M fp32, a norm-8 vector at layer 12 (alpha 1), interleaved ``--repeats`` times:

1. ``unsteered``: no spec;
2. ``plain``: every request steered, no gate;
3. ``gated``: every request steered under a prompt condition at layer 6 (about half open);
4. ``gated-token``: the same under an ``on="token"`` condition (re-decided per token);
5. ``gated-rules``: three rules per request, first match wins (the prompt condition -> the vector; a token
   condition on the opposite direction -> a second vector at layers 12 and 14; else -> the vector at alpha -0.5).

Reported per round: seconds of each, and the ratios gated / plain and gated-token / plain (the issue's target:
<= 1.10 at batch 32); the median over rounds with the load average before each timing. The "no request gated"
cost is ``plain`` itself: a step without gated requests takes the plain path plus one ``spec.gated`` check per
request, so it is measured by comparing ``plain`` here against the base branch's ``bench_vllm.py``.

Run (on an idle machine):
    STEERSCOPE_VLLM_ENV=... python benchmarks/bench_vllm_gates.py --repeats 5 --json

The "no request gated" cost cannot be resolved between engine processes (their own spread is several %), so
``--no-gate-code`` times it inside one process instead, without vLLM: the worker's only code that runs for gates
on a step where no request is gated (``SteerExtension._ss_rows`` over the step's plain specs, then one
``if step.rows`` per layer hook), against the step time of the ``plain`` configuration of a recorded engine run
(``--step-seconds``; default: the median of ``results/vllm_gates/gates_main.json`` divided by its steps)::

    python benchmarks/bench_vllm_gates.py --no-gate-code --json

``--compiled`` times the compiled engine instead (vLLM's torch.compile; conditions evaluated in the graph,
``steerscope_vllm_plugin.gated_add``): two compiled engines side by side, one built with gate sites and one
without, interleaved per round: ``unsteered`` and ``plain`` on both (their ratio is what the gate sites cost
when no request is gated: on CPU the graph's gate operator skips the gate arithmetic on such steps) and
``gated`` and ``gated-token`` on the one with gate sites::

    STEERSCOPE_VLLM_ENV=... python benchmarks/bench_vllm_gates.py --compiled --repeats 5 --json

``--compiled --sites-only`` starts only the engine with gate sites (half the memory and CPU of two engines side
by side, which made rounds noisy on 2 cores) and interleaves the ``--configs`` on it; the README's figures::

    STEERSCOPE_VLLM_ENV=... python benchmarks/bench_vllm_gates.py --compiled --sites-only --repeats 7 \
        --configs plain,gated,gated-token,gated-rules --json

``--compiled --no-gate-code`` times the gate sites on a step where no request is gated, in one process without
vLLM (:func:`compiled_no_gate_code`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import steerscope as ss
from steerscope.backends import vllm as bv

PROMPTS = ["Tell me about your weekend.", "What is the capital of France?", "Write a haiku about rain.",
           "How do I bake bread?", "Explain photosynthesis to a child.", "Give me three tips for sleeping well.",
           "What is 17 times 23?", "Describe the sea in one sentence."] * 4


CONFIGS = ("unsteered", "plain", "gated", "gated-token", "gated-rules")


def configs(lm: ss.LM, eng: bv.Engine, names: tuple[str, ...] = CONFIGS) -> dict[str, list[Any]]:
    """One spec list per configuration (32 requests each); only ``names`` are built (``unsteered,plain`` needs no
    condition support, so the same script times a checkout from before the gates)."""
    g = torch.Generator().manual_seed(0)
    vec = ss.SteeringVector({12: 8 * torch.nn.functional.normalize(torch.randn(lm.d_model, generator=g), dim=0)})
    d = torch.randn(lm.d_model, generator=g)
    w = ss.SteeringVector({k: 8 * torch.nn.functional.normalize(torch.randn(lm.d_model, generator=g), dim=0)
                           for k in (12, 14)})
    n = len(PROMPTS)

    def rules() -> list[Any]:
        c, t = ss.Condition(d, layer=6, threshold=0.0), ss.Condition(-d, layer=6, threshold=0.0, on="token")
        return [bv.spec(eng, None, rules=[(c, vec, 1.0), (t, w, 1.0), (None, vec, -0.5)])] * n
    make = {"unsteered": lambda: [None] * n, "plain": lambda: [bv.spec(eng, vec, 1.0)] * n,
            "gated": lambda: [bv.spec(eng, vec, 1.0, condition=ss.Condition(d, layer=6, threshold=0.0))] * n,
            "gated-token": lambda: [bv.spec(eng, vec, 1.0,
                                            condition=ss.Condition(d, layer=6, threshold=0.0, on="token"))] * n,
            "gated-rules": rules}
    return {k: make[k]() for k in names}


def no_gate_code(n_requests: int = 32, n_layers: int = 30, reps: int = 2000) -> dict[str, float]:
    """Seconds per step of the worker's gate code when no request is gated (the median of 7 timings of ``reps``
    steps): ``_ss_rows`` over ``n_requests`` plain specs (one decode token each) and ``n_layers`` row checks."""
    import sys
    import timeit
    from types import SimpleNamespace

    sys.path.insert(0, str(bv.ENGINE_DIR))
    from steerscope_vllm_adapter import SteerExtension, _Step
    from steerscope_vllm_spec import Spec, parse_spec

    worker = SimpleNamespace(_ss_gates={})
    req_ids = [f"r{i}" for i in range(n_requests)]
    specs = [Spec(vectors=(("v", 1.0),))] * n_requests
    qsl, pos = torch.arange(n_requests + 1), torch.full((n_requests,), 40)
    prompt_len = torch.full((n_requests,), 20)

    def step() -> None:
        st = _Step({}, None)
        st.rows = SteerExtension._ss_rows(worker, req_ids, specs, qsl, pos, prompt_len)  # type: ignore[arg-type]
        for _ in range(n_layers):
            if st.rows:
                raise AssertionError("a plain spec made a gated row")

    times = timeit.repeat(step, number=reps, repeat=7)
    raw = json.dumps({"vectors": [["v", 1.0]], "positions": "all"})  # parsed once per request, gate fields included
    parse = timeit.repeat(lambda: parse_spec(raw, {"v"}), number=reps, repeat=7)
    return {"seconds_per_step": statistics.median(times) / reps, "parse_seconds_per_request": statistics.median(parse) / reps,
            "n_requests": n_requests, "n_layers": n_layers, "reps": reps}


def compiled_no_gate_code(n_tokens: int = 32, n_layers: int = 30, d: int = 576, reps: int = 200
                          ) -> dict[str, float]:
    """Seconds per step that gate sites add to a compiled step where no request is gated, in this process, without
    vLLM: a toy decoder of ``n_layers`` trivial layers with vLLM's layer signature, SmolLM2-135M's width, given the
    plugin's sites (plain steering sites vs the same with gate sites, ``gany`` false as the worker writes it on
    such a step), each compiled with Inductor (``dynamic=True``, as vLLM compiles); the median of 7 timings of
    ``reps`` forward passes of ``n_tokens`` tokens (one decode token per request)."""
    import sys
    import timeit
    from types import SimpleNamespace

    sys.path.insert(0, str(bv.ENGINE_DIR))
    import steerscope_vllm_plugin as plugin

    class Layer(torch.nn.Module):
        def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            residual = hidden if residual is None else hidden + residual
            return residual * 0.5, residual

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(n_layers))

        def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            residual = None
            for layer in self.layers:
                hidden, residual = layer(positions, hidden, residual)
            return hidden + residual

    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=2048, max_num_seqs=256),
                          model_config=SimpleNamespace(get_hidden_size=lambda: d, dtype=torch.float32))
    x, pos = torch.randn(n_tokens, d), torch.arange(n_tokens)
    out: dict[str, float] = {}
    for name, gates in (("plain_sites", False), ("gate_sites", True)):
        toy = SimpleNamespace(model=Inner().eval(), parameters=lambda: iter([x]))  # add_sites reads the device
        sites = plugin.add_sites(toy, cfg, False, gates=gates)
        sites.idx[:n_tokens] = 1  # every token plainly steered (row 1), as in the "plain" configuration
        sites.table[:, 1] = 0.01
        compiled = torch.compile(toy.model, backend="inductor", dynamic=True, fullgraph=True)
        with torch.no_grad():
            for _ in range(3):
                compiled(pos, x)  # compile and warm up

            def step() -> None:
                with torch.no_grad():
                    compiled(pos, x)
            out[name] = statistics.median(timeit.repeat(step, number=reps, repeat=7)) / reps
    return {"seconds_per_step": out["gate_sites"] - out["plain_sites"], **{f"{k}_seconds": v for k, v in out.items()},
            "n_tokens": n_tokens, "n_layers": n_layers, "d_model": d, "reps": reps}


def per_step(cost: dict[str, Any], step_s: float | None, record: str, config: str) -> dict[str, Any]:
    """``cost`` with the step it is divided by: ``step_s`` if given, else the ``config`` median of the recorded
    engine run ``results/vllm_gates/<record>`` over its steps (one prefill step + one step per new token)."""
    source = "--step-seconds"
    if step_s is None:
        rec = json.loads((Path(__file__).parent / "results" / "vllm_gates" / record).read_text())
        step_s = rec["median"][config] / (rec["new_tokens"] + 1)
        source = f"results/vllm_gates/{record}: {config} median / (new_tokens + 1)"
    return {**cost, "step_seconds": step_s, "step_source": source, "fraction_of_step": cost["seconds_per_step"] / step_s}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds with each figure's median and [min, max] over them."""
    return {"rounds": rounds, "median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
            "range": {k: [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in rounds[0]},
            "n_rounds": len(rounds), "batch": len(PROMPTS)}


def compiled_rounds(repeats: int, tokens: int, names: tuple[str, ...] = CONFIGS, sites_only: bool = False
                    ) -> dict[str, Any]:
    """Interleaved rounds on two compiled engines (gate sites on / off; ``sites_only``: only the one with gate
    sites, so no second engine shares the CPU); seconds per configuration and the ratios."""
    lm = ss.load_model("smollm2-135m")
    folder, dtype = str(bv.export_folder(lm)), str(lm.dtype).removeprefix("torch.")
    engines = {"sites": bv.Engine(folder, dtype=dtype, compiled=True, gate_sites=True).start()}
    if not sites_only:
        engines["nosites"] = bv.Engine(folder, dtype=dtype, compiled=True, gate_sites=False).start()
    ids = bv.prompt_ids(lm, [lm.format_chat(p) for p in PROMPTS], True)
    params = dict(bv.stop_params(lm, tokens, False, 1.0, None), stop_token_ids=[], ignore_eos=True)
    cases = {f"{k}:{c}": (eng, specs) for k, eng in engines.items()
             for c, specs in configs(lm, eng, names if k == "sites" else ("unsteered", "plain")).items()}
    for eng, specs in cases.values():  # warm-up: every configuration once (compiles each shape)
        eng.generate_ids(ids, specs, params)
    rounds = []
    for _ in range(repeats):
        row: dict[str, Any] = {"load": os.getloadavg()[0]}
        for name, (eng, specs) in cases.items():
            t0 = time.perf_counter()
            eng.generate_ids(ids, specs, params)
            row[name] = time.perf_counter() - t0
        for k in ("gated", "gated-token", "gated-rules"):
            if f"sites:{k}" in row and "sites:plain" in row:
                row[f"{k}/plain"] = row[f"sites:{k}"] / row["sites:plain"]
        for k in ("unsteered", "plain"):
            if f"sites:{k}" in row and f"nosites:{k}" in row:
                row[f"sites/nosites {k}"] = row[f"sites:{k}"] / row[f"nosites:{k}"]
        rounds.append(row)
    for eng in engines.values():
        eng.close()
    return {**summarise(rounds), "new_tokens": tokens, "compiled": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-gate-code", action="store_true", help="time the gate code of a step where no request is "
                    "gated, in this process, without vLLM (see the module docstring)")
    ap.add_argument("--step-seconds", type=float, default=None, help="a plain steered step's seconds for "
                    "--no-gate-code (default: from results/vllm_gates/gates_main.json)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)} "
                    "(default: all)")
    ap.add_argument("--compiled", action="store_true", help="time compiled engines with and without gate sites "
                    "(see the module docstring); with --no-gate-code: the compiled gate sites' cost on an ungated "
                    "step, in this process")
    ap.add_argument("--sites-only", action="store_true", help="with --compiled: only the engine with gate sites "
                    "(no second engine beside it)")
    args = ap.parse_args()
    if args.compiled and args.no_gate_code:
        cost = compiled_no_gate_code()
        out = per_step(cost, args.step_seconds, "gates_compiled_token.json", "nosites:plain")
        step_s = out["step_seconds"]
        print(json.dumps(out, indent=1) if args.json else
              f"compiled gate sites with no gated request: {cost['seconds_per_step'] * 1e6:.1f} us per step = "
              f"{100 * out['fraction_of_step']:.3f} % of a {step_s * 1e3:.1f} ms plain steered compiled step")
        return
    if args.compiled:
        out = compiled_rounds(args.repeats, args.tokens, tuple(args.configs.split(",")), args.sites_only)
        print(json.dumps(out, indent=1) if args.json else out["median"])
        return
    if args.no_gate_code:
        cost = no_gate_code()
        out = per_step(cost, args.step_seconds, "gates_main.json", "plain")
        step_s = out["step_seconds"]
        print(json.dumps(out, indent=1) if args.json else
              f"gate code with no gated request: {cost['seconds_per_step'] * 1e6:.1f} us per step = "
              f"{100 * out['fraction_of_step']:.3f} % of a {step_s * 1e3:.1f} ms plain steered step; the whole spec "
              f"parse (once per request, gate fields included) {cost['parse_seconds_per_request'] * 1e6:.1f} us")
        return
    lm = ss.load_model("smollm2-135m")
    eng = bv.engine_for(lm)
    ids = bv.prompt_ids(lm, [lm.format_chat(p) for p in PROMPTS], True)
    params = dict(bv.stop_params(lm, args.tokens, False, 1.0, None), stop_token_ids=[], ignore_eos=True)
    cases = configs(lm, eng, tuple(args.configs.split(",")))
    eng.generate_ids(ids, next(iter(cases.values())), params)  # warm-up
    rounds = []
    for _ in range(args.repeats):
        row: dict[str, Any] = {"load": os.getloadavg()[0]}
        for name, specs in cases.items():
            t0 = time.perf_counter()
            eng.generate_ids(ids, specs, params)
            row[name] = time.perf_counter() - t0
        for k in ("gated", "gated-token", "gated-rules"):
            if k in row and "plain" in row:
                row[f"{k}/plain"] = row[k] / row["plain"]
        rounds.append(row)
    out = {**summarise(rounds), "new_tokens": args.tokens}
    print(json.dumps(out, indent=1) if args.json else out["median"])
    bv.close_engines()


if __name__ == "__main__":
    main()
