"""steerscope steering inside vLLM: a worker extension class (runs in the engine environment).

This file is imported by vLLM's worker processes (``LLM(worker_extension_cls=
"steerscope_vllm_adapter.SteerExtension")``, or ``--worker-extension-cls`` of ``vllm serve``) and
needs only torch, safetensors and vllm; it never imports steerscope. It is the one place that
reads vLLM internals, checked against :data:`SUPPORTED`.

Algorithm (one engine step, continuous batching):
1. A forward pre-hook on the model reads the step's request layout from the V1 model runner:
   ``input_batch.req_ids`` (batch order), ``query_start_loc`` (tokens per request, the flattened
   per-token layout), ``input_batch.num_prompt_tokens`` and each request's
   ``sampling_params.extra_args["steerscope"]`` (its steering spec).
2. It builds, per steered layer, a per-token delta ``[tokens d_model]``: row t is
   ``sum_k alpha_k * v_k[layer]`` of token t's request, masked by the request's positions
   (``all`` / ``prompt``: position < prompt length / ``generated``). Rows of unsteered requests are 0.
3. A forward pre-hook on decoder layer L adds the delta to steerscope's ``resid_pre`` of L. vLLM's
   layers take ``(positions, hidden_states, residual)`` and fuse add + RMSNorm, so resid_pre is
   ``hidden + residual``: the delta goes into ``residual`` (into ``hidden`` at L = 0, where residual is None).
   Layer L = n_layers is the input of the final norm (``model.model.norm(hidden, residual)``, the same fused
   add): the stream leaving the last block, where ``mlp_out`` / ``resid_post`` of the last block land.
4. Directional ablation (Arditi et al.) projects the request's unit direction out of resid_pre
   (hidden and residual both), attn_out and mlp_out of every layer, all positions, like
   ``steerscope.ablation``.
5. Gated requests (a spec with ``condition`` / ``rules`` / ``clamp``, parsed by ``steerscope_vllm_spec``): each
   layer hook also runs ``steerscope_vllm_gates.apply_rows``, which reads the request's own residual at its
   conditions' layers, keeps per-request running state across steps, and adds / clamps only where its gate is
   open. A compiled engine built with gate sites (``STEERSCOPE_VLLM_GRAPH='<arch>;gates'``) runs up to 3 rules and
   a clamp gated by up to 4 conditions in the graph instead (``steerscope_vllm_plugin.gated_add``; this extension
   writes each gated request's slot once and the per-token slot map each step); it refuses the rest with
   ``steerscope_vllm_gates.compiled_refusal``'s reason.

6. Seeded sampling on CPU: vLLM rewinds a seeded request's generator after a sample it discards (a prompt
   prefilled in chunks: every chunk but the last) with ``get_offset``/``set_offset``, which only CUDA generators
   have (a CPU one raises "CPU Generator does not use offset" and the engine fails). The pre-hook replaces such a
   row's CPU generator by a :class:`_RewindableGenerator` holding its state before the step, which
   ``set_offset`` restores: the sample is undone exactly, so a row's draws do not depend on how its prompt was
   chunked (that is, on the rest of the batch).

Hooks do not run in a compiled (torch.compile / CUDA graph) model: :meth:`steerscope_install`
refuses unless compilation is off (``enforce_eager=True``), and the engine counts hook calls so a
silent bypass is detected.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from steerscope_vllm_spec import POSITIONS, ClampSpec, Spec, finite_alpha, parse_spec  # noqa: F401 (re-exported)

SUPPORTED = ("0.32.",)
FINAL_GATED = ("a gated request steers the final norm's input (mlp_out / resid_post of the last block), which the "
               "compiled engine's graph steers ungated only; use the eager engine (compiled=False; serve without "
               "--compiled)")
log = logging.getLogger("steerscope.vllm")


def check_version() -> str:
    """The vLLM version, or RuntimeError when the model-runner internals read here are unchecked."""
    import vllm

    v = str(vllm.__version__)
    if not v.startswith(SUPPORTED):
        raise RuntimeError(f"steerscope's vLLM adapter reads V1 model-runner internals checked on vLLM "
                           f"{', '.join(s + 'x' for s in SUPPORTED)}; this is vLLM {v}. Install the checked "
                           "version (steerscope vllm-setup) or update SUPPORTED after re-running the parity tests.")
    return v


def read_vector(path: str) -> dict[int, torch.Tensor]:
    """A steerscope vector file (safetensors, tensors ``layer.{l}``, site resid_pre) -> {layer: [d_model]}."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("steerscope", "{}"))
        site = meta.get("site", "resid_pre")
        if site != "resid_pre":
            raise ValueError(f"{path}: site {site!r}; the vLLM backend steers resid_pre only")
        out = {int(k.split(".", 1)[1]): f.get_tensor(k).float() for k in f.keys() if k.startswith("layer.")}
    if not out:
        raise ValueError(f"{path} holds no 'layer.N' tensors; write it with SteeringVector.save")
    return out


@dataclass
class _Step:
    """Per-step tensors: per-layer deltas [tokens d_model] and per-token unit directions or None."""

    delta: dict[int, torch.Tensor]
    ablate: torch.Tensor | None
    rows: list[Any] = field(default_factory=list)  # gated requests (steerscope_vllm_gates.Row)


def _project(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x - (x·r) r, row-wise; rows with r = 0 are returned unchanged. x, r [tokens d_model]."""
    n = min(x.shape[0], r.shape[0])
    out = x.clone()
    out[:n] = x[:n] - (x[:n] * r[:n]).sum(-1, keepdim=True) * r[:n]
    return out


def _zero_sites(sites: Any) -> None:
    """Graph buffers for a step that steers nothing: every token reads the zero row and no gate slot."""
    sites.idx.zero_()
    if sites.gates:
        sites.gslot.zero_()
        sites.gtok.zero_()
        sites.gany.fill_(False)


def _summed(pairs: Any, vectors: dict[str, dict[int, torch.Tensor]], n_layers: int, d: int) -> torch.Tensor:
    """[layers d] float32: ``sum alpha * v[layer]`` over a request's (or rule's) ``(name, alpha)`` pairs, in order."""
    out = torch.zeros(n_layers, d)
    for name, alpha in pairs:
        for layer, v in vectors[name].items():
            out[layer] += alpha * v
    return out


def _init_slot(sites: Any, slot: int, spec: Spec, vectors: dict[str, dict[int, torch.Tensor]]) -> None:
    """Write a gated request's slot: its leaves (direction, center·d̂, scale, threshold, layer, reduce, on), a fresh
    running state (sum 0, count 0, max −inf, prompt leaves undecided; token and unused leaves decided), its rules'
    and its clamp's truth tables, its later rules' deltas (the first rule's is its row of ``table``) and their
    positions, and its clamp (unit direction per layer, lo, hi, positions)."""
    from steerscope_vllm_gates import ON, REDUCE, spec_leaves, truth_table

    k, d = sites.gdir.shape[1], sites.gdir.shape[2]
    found = spec_leaves(spec)
    dirs, par, state = torch.zeros(k, d), torch.zeros(k, 6), torch.zeros(k, 5)
    par[:, 1], par[:, 3], state[:, 2], state[:, 4] = 1.0, -1.0, -float("inf"), 1.0
    for j, leaf in enumerate(found):
        dirs[j] = leaf.unit
        cd = 0.0 if leaf.center is None else float(leaf.center.double() @ leaf.unit.double())
        par[j] = torch.tensor([cd, leaf.scale, leaf.threshold, float(leaf.layer), float(REDUCE.index(leaf.reduce)),
                               float(ON.index(leaf.on))])
        state[j, 4] = float(leaf.on == "token")  # a token leaf decides every token itself
    n_rules, n_layers = sites.gtt.shape[1], sites.gclamp.shape[0]
    rule = [truth_table(g, found, k) for g, _ in spec.rules] + [[0.0] * 2**k] * (n_rules - len(spec.rules))
    later = torch.zeros(n_layers, n_rules - 1, d)
    for r, (_, pairs) in enumerate(spec.rules[1:]):
        later[:, r] = _summed(pairs, vectors, n_layers, d)  # as the first rule's table row
    steers = [float(spec.positions in ("all", "prompt")), float(spec.positions in ("all", "generated"))]
    cl = spec.clamp
    clamp_table = truth_table(cl.gate, found, k) if cl is not None else [0.0] * 2**k
    rows = torch.zeros(n_layers, d)
    bounds = torch.tensor([-float("inf"), float("inf"), 0.0, 0.0])
    if cl is not None:
        for layer, v in vectors[cl.name].items():
            rows[layer] = v / v.norm().clamp_min(1e-30)
        bounds = torch.tensor([-float("inf") if cl.lo is None else cl.lo, float("inf") if cl.hi is None else cl.hi,
                               float(cl.positions in ("all", "prompt")), float(cl.positions in ("all", "generated"))])
    dev = sites.gdir.device
    sites.gdir[slot] = dirs.to(dev)
    sites.gparam[slot] = par.to(dev)
    sites.gstate[slot] = state.to(dev)
    sites.gtt[slot] = torch.tensor(rule).to(dev)
    sites.gctt[slot] = torch.tensor(clamp_table).to(dev)
    sites.gxtab[:, slot] = later.to(device=dev, dtype=sites.gxtab.dtype)
    sites.gpos[slot] = torch.tensor(steers).to(dev)
    sites.gclamp[:, slot] = rows.to(dev)
    sites.gcb[slot] = bounds.to(dev)


def gated_names(spec: Spec) -> list[str]:
    """The vector names a gated spec steers with: its rules' and its clamp's."""
    names = [name for _, pairs in spec.rules for name, _ in pairs]
    return names + ([spec.clamp.name] if spec.clamp is not None else [])


def final_norm(model: Any) -> Any:
    """The model's final norm module (``model.model.norm``), or None where there is none on this rank (another
    pipeline stage holds it) or it is not called as ``norm(hidden, residual)`` by a model checked here."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None or type(norm).__name__ == "PPMissingLayer":
        return None
    return norm


def _add(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n = min(x.shape[0], d.shape[0])
    out = x.clone()
    out[:n] += d[:n]
    return out


class _RewindableGenerator(torch.Generator):
    """A CPU generator that vLLM can rewind: ``set_offset`` restores the state recorded at the start of the step.

    vLLM's model runner undoes a discarded sample with ``gen.set_offset(gen.get_offset() - 4)`` (Philox offsets, CUDA
    only); here any ``set_offset`` restores ``start``, the state before this step's draws (see step 6 above).
    """

    start: torch.Tensor | None = None

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> _RewindableGenerator:
        if self.start is not None:
            self.set_state(self.start)
        return self


def _rewindable_generators(runner: Any, n: int) -> int:
    """Record the state of every CPU generator whose sample this step discards (``discard_request_mask``),
    swapping it for a :class:`_RewindableGenerator` (in the batch and in the request's own state). Returns
    how many rows were prepared."""
    mask = getattr(runner, "discard_request_mask", None)
    gens = runner.input_batch.generators
    if mask is None or not gens:
        return 0
    done = 0
    for i in mask.np[:n].nonzero()[0].tolist():
        g = gens.get(i)
        if g is None or g.device.type != "cpu":
            continue
        if not isinstance(g, _RewindableGenerator):
            new = _RewindableGenerator(device="cpu")
            new.set_state(g.get_state())
            gens[i] = new
            state = runner.requests.get(runner.input_batch.req_ids[i])
            if state is not None and state.generator is g:
                state.generator = new
            g = new
        g.start = g.get_state()
        done += 1
    return done


class SteerExtension:
    """Mixed into vLLM's worker; methods are called through ``collective_rpc("steerscope_...")``."""

    _ss_n_layers: int
    _ss_d_model: int

    def steerscope_install(self) -> dict[str, Any]:
        """Hook the model (idempotent); load vectors named in $STEERSCOPE_VECTORS (JSON name -> path)."""
        version = check_version()
        from vllm.config import CompilationMode

        cfg = self.vllm_config  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        sites = getattr(model, "_steerscope_sites", None)  # graph-safe buffers (steerscope_vllm_plugin)
        compiled = cfg.compilation_config.mode != CompilationMode.NONE or not cfg.model_config.enforce_eager
        if compiled and sites is None:
            raise RuntimeError("steerscope steering of a compiled model needs the graph-safe sites, built with the "
                               "model (set STEERSCOPE_VLLM_GRAPH to its architectures; steerscope's launchers do "
                               "this with compiled=True / --compiled), or start vLLM with --enforce-eager")
        if sites is not None:
            mode = str(getattr(cfg.compilation_config, "cudagraph_mode", "NONE"))
            if "FULL" in mode.upper():
                raise RuntimeError(f"cudagraph_mode {mode} replays the whole forward, so the per-step buffer writes "
                                   "would not run; use cudagraph_mode PIECEWISE (or NONE)")
        if getattr(self, "_ss_handles", None):
            return {"version": version, "layers": self._ss_n_layers, "graph": sites is not None}
        self._ss_vectors: dict[str, dict[int, torch.Tensor]] = {}
        self._ss_specs: dict[str, Spec | None] = {}
        self._ss_step: _Step | None = None
        self._ss_calls = 0
        self._ss_bad: list[str] = []
        self._ss_gates: dict[str, dict[int, Any]] = {}  # req id -> leaf id -> running state (gated requests)
        self._ss_gslots: dict[str, int] = {}  # compiled: req id -> its gate slot (1..rows-1)
        self._ss_gdecided: dict[str, bool] = {}  # compiled: req id -> its prompt conditions decided
        for name, path in json.loads(os.environ.get("STEERSCOPE_VECTORS", "{}")).items():
            self.steerscope_register(name, path)
        layers = model.model.layers
        self._ss_n_layers = len(layers)
        self._ss_d_model = int(cfg.model_config.get_hidden_size())
        self._ss_sites = sites
        self._ss_table_key: Any = None
        handles = [model.register_forward_pre_hook(self._ss_begin_step, with_kwargs=True)]
        if sites is not None:  # the layers' in-graph hooks exist already; this eager hook only writes buffers
            self._ss_handles = handles
            return {"version": version, "layers": self._ss_n_layers, "graph": True,
                    "compilation_mode": str(cfg.compilation_config.mode), "enforce_eager": cfg.model_config.enforce_eager}
        for i, layer in enumerate(layers):
            if type(layer).__name__ == "PPMissingLayer":  # another pipeline stage holds it
                continue
            handles.append(layer.register_forward_pre_hook(self._ss_layer_hook(i), with_kwargs=True))
            for sub in ("self_attn", "mlp"):
                handles.append(getattr(layer, sub).register_forward_hook(self._ss_out_hook))
        norm = final_norm(model)
        if norm is not None:  # the stream leaving the last block: steering "layer n_layers"
            handles.append(norm.register_forward_pre_hook(self._ss_norm_hook(self._ss_n_layers)))
        self._ss_handles = handles
        return {"version": version, "layers": self._ss_n_layers, "graph": False}

    def steerscope_register(self, name: str, path: str) -> list[int]:
        """Load a vector file under ``name`` (replacing one of that name); returns its layers."""
        vec = read_vector(path)
        n_layers = getattr(self, "_ss_n_layers", None)
        d = int(self.vllm_config.model_config.get_hidden_size())  # type: ignore[attr-defined]
        for layer, t in vec.items():
            if t.shape != (d,):
                raise ValueError(f"vector {name!r} layer {layer} has shape {tuple(t.shape)}, the model needs [{d}]")
            if n_layers is not None and not 0 <= layer <= n_layers:  # n_layers: the final norm's input
                raise ValueError(f"vector {name!r} has layer {layer}; the model has {n_layers} (steerable: resid_pre "
                                 f"0..{n_layers}, where {n_layers} is the input of the final norm)")
        self._ss_vectors[name] = vec
        self._ss_specs.clear()
        self._ss_table_key = None
        return sorted(vec)

    def steerscope_stats(self) -> dict[str, Any]:
        """Hook calls on steered steps (0 after steered requests means the hooks were bypassed)."""
        stream = getattr(self, "_ss_stream", None)  # the stream just after the last steered addition (eager)
        return {"steered_layer_calls": self._ss_calls, "vectors": sorted(self._ss_vectors), "bad": self._ss_bad[-5:],
                "last_steered_step": getattr(self, "_ss_last", None),
                "rewindable_rows": getattr(self, "_ss_rewinds", 0),
                "last_steered_stream_sum": None if stream is None else float(stream.double().sum())}

    # -- hooks -------------------------------------------------------------------------------
    def _ss_spec(self, req_id: str) -> Spec | None:
        if req_id not in self._ss_specs:
            state = self.model_runner.requests.get(req_id)  # type: ignore[attr-defined]
            sp = getattr(state, "sampling_params", None)
            raw = (getattr(sp, "extra_args", None) or {}).get("steerscope")
            try:
                spec = parse_spec(raw, set(self._ss_vectors))
                if spec is not None and spec.gated:
                    self._ss_check_gated(spec)
                self._ss_specs[req_id] = spec
            except ValueError as e:  # validated before submission; never crash the engine here
                self._ss_bad.append(f"{req_id}: {e}")
                log.error("steerscope: request %s left unsteered: %s", req_id, e)
                self._ss_specs[req_id] = None
        return self._ss_specs[req_id]

    def _ss_check_gated(self, spec: Spec) -> None:
        from steerscope_vllm_gates import check_spec

        if self._ss_sites is not None:
            from steerscope_vllm_gates import compiled_refusal

            why = compiled_refusal(spec, self._ss_sites.gates)
            if why:
                raise ValueError(why)
            if any(self._ss_n_layers in self._ss_vectors[name] for name in gated_names(spec)):
                raise ValueError(FINAL_GATED)
        check_spec(spec, self._ss_vectors, self._ss_n_layers, self._ss_d_model)

    def _ss_rows(self, req_ids: list[str], specs: list[Spec | None], qsl: torch.Tensor, pos: torch.Tensor,
                 prompt_len: torch.Tensor) -> list[Any]:
        """The gated requests of this step (steerscope_vllm_gates.Row); running states restart at position 0."""
        from steerscope_vllm_gates import Row, fresh, spec_leaves

        rows = []
        for i, (req, s) in enumerate(zip(req_ids, specs)):
            if s is None or not s.gated:
                continue
            start, end = int(qsl[i]), int(qsl[i + 1])
            if end <= start:
                continue
            states = self._ss_gates.get(req)
            if states is None or int(pos[start]) == 0:
                states = self._ss_gates[req] = {id(leaf): fresh() for leaf in spec_leaves(s)}
            rows.append(Row(start, end - start, pos[start:end], int(prompt_len[i]), s, states, {}))
        return rows

    def _ss_begin_step(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._ss_step = None
        sites = self._ss_sites
        runner = self.model_runner  # type: ignore[attr-defined]
        ib = runner.input_batch
        n = int(ib.num_reqs)
        self._ss_rewinds = getattr(self, "_ss_rewinds", 0) + _rewindable_generators(runner, n)
        req_ids = list(ib.req_ids[:n]) if n else []
        if len(self._ss_specs) > 4 * max(n, 64):
            self._ss_specs = {r: self._ss_specs[r] for r in req_ids if r in self._ss_specs}
            self._ss_gates = {r: self._ss_gates[r] for r in req_ids if r in self._ss_gates}
        specs = [self._ss_spec(r) for r in req_ids]
        if all(s is None for s in specs):
            if sites is not None and self._ss_table_key != ():
                _zero_sites(sites)  # every token reads the zero row
                self._ss_table_key = ()
            return
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None:
            if sites is not None:
                _zero_sites(sites)
                self._ss_table_key = ()
            return
        qsl = torch.from_numpy(runner.query_start_loc.np[: n + 1].astype("int64"))
        counts = qsl.diff()
        tok_req = torch.repeat_interleave(torch.arange(n), counts)  # [tokens]
        pos = positions[: tok_req.shape[0]].to("cpu", torch.int64)
        prompt_len = torch.from_numpy(ib.num_prompt_tokens[:n].astype("int64"))
        is_gen = pos >= prompt_len[tok_req]
        self._ss_last = {"tokens": int(tok_req.shape[0]), "prompt_len": prompt_len.tolist(),
                         "counts": counts.tolist(), "generated_tokens": int(is_gen.sum()),
                         "positions": pos[:80].tolist(), "req_ids": req_ids}
        if sites is not None:
            self._ss_write_sites(sites, req_ids, specs, tok_req, is_gen)
            if sites.gates:
                self._ss_write_gates(sites, req_ids, specs, qsl, pos, prompt_len)
            return
        self._ss_step = self._ss_build(specs, tok_req, is_gen, positions.device)
        self._ss_step.rows = self._ss_rows(req_ids, specs, qsl, pos, prompt_len)

    def _ss_write_sites(self, sites: Any, req_ids: list[str], specs: list[Spec | None], tok_req: torch.Tensor,
                        is_gen: torch.Tensor) -> None:
        """Graph mode: token -> row indices every step; the rows themselves when the batch's steering changed."""
        n, t = len(specs), int(tok_req.shape[0])
        if 2 * n + 1 > sites.rows or t > sites.max_tokens:
            raise RuntimeError(f"steerscope: step of {n} requests / {t} tokens exceeds the graph buffers "
                               f"({(sites.rows - 1) // 2} / {sites.max_tokens})")
        steered = torch.tensor([s is not None for s in specs])
        rows = torch.where(steered[tok_req], 1 + 2 * tok_req + is_gen.long(), torch.zeros_like(tok_req))
        idx = torch.zeros(sites.max_tokens, dtype=torch.int64)
        idx[:t] = rows
        sites.idx.copy_(idx)
        key = (tuple(req_ids), tuple(specs))
        if key == self._ss_table_key:
            return
        n_layers, d = sites.table.shape[0], sites.table.shape[2]
        table = torch.zeros(n_layers, 2 * n + 1, d)
        rt = torch.zeros(2 * n + 1, d) if sites.rtable is not None else None
        for i, s in enumerate(specs):
            if s is None:
                continue
            delta = _summed(s.vectors or (s.rules[0][1] if s.rules else ()), self._ss_vectors, n_layers, d)  # gated:
            if s.positions in ("all", "prompt"):  # its first rule's vectors
                table[:, 1 + 2 * i] = delta
            if s.positions in ("all", "generated"):
                table[:, 2 + 2 * i] = delta
            if s.ablate:
                if rt is None:
                    raise RuntimeError("steerscope: this compiled engine was built without ablation sites; "
                                       "start it with STEERSCOPE_VLLM_GRAPH='<arch>;ablate'")
                v = next(iter(self._ss_vectors[s.ablate].values()))
                rt[1 + 2 * i] = rt[2 + 2 * i] = v / v.norm().clamp_min(1e-30)  # a zero direction (refused at the door) stays 0
        sites.table[:, : 2 * n + 1].copy_(table)
        if rt is not None:
            sites.rtable[: 2 * n + 1].copy_(rt)
        self._ss_calls += 1
        self._ss_table_key = key

    def _ss_write_gates(self, sites: Any, req_ids: list[str], specs: list[Spec | None], qsl: torch.Tensor,
                        pos: torch.Tensor, prompt_len: torch.Tensor) -> None:
        """Graph mode with gate sites: each gated request's slot (written when it starts at position 0), and per
        token its slot, whether it is a prompt token and whether it is the last one (steerscope_vllm_plugin)."""
        from steerscope_vllm_gates import _steers_prompt, spec_leaves

        alive = self.model_runner.requests  # type: ignore[attr-defined]
        for gone in [r for r in self._ss_gslots if r not in alive]:
            del self._ss_gslots[gone]
            self._ss_gdecided.pop(gone, None)
        slot_tok = torch.zeros(sites.max_tokens, dtype=torch.int64)
        flags = torch.zeros(sites.max_tokens, 2)
        for i, (req, s) in enumerate(zip(req_ids, specs)):
            start, end = int(qsl[i]), int(qsl[i + 1])
            if s is None or not s.gated or end <= start:
                continue
            p, plen = pos[start:end], int(prompt_len[i])
            if req not in self._ss_gslots or int(p[0]) == 0:  # new, or preempted and recomputed: restart
                self._ss_gslots[req] = self._ss_gslots.get(req) or self._ss_free_slot(sites, set(req_ids))
                self._ss_gdecided[req] = all(leaf.on == "token" for leaf in spec_leaves(s))  # nothing to wait for
                _init_slot(sites, self._ss_gslots[req], s, self._ss_vectors)
            slot_tok[start:end] = self._ss_gslots[req]
            flags[start:end, 0] = (p < plen).float()
            flags[start:end, 1] = (p == plen - 1).float()
            if not self._ss_gdecided[req]:
                if bool((p == plen - 1).any()):
                    self._ss_gdecided[req] = True
                elif _steers_prompt(s):
                    self._ss_bad.append(f"a prompt condition's prompt was split over engine steps (chunked "
                                        f"prefill); a chunk of {end - start} prompt tokens was left unsteered")
        sites.gslot.copy_(slot_tok.to(sites.gslot.device))
        sites.gtok.copy_(flags.to(sites.gtok.device))
        sites.gany.fill_(bool(slot_tok.any()))  # CPU graphs skip the gate arithmetic on steps without a gated token

    def _ss_free_slot(self, sites: Any, batch: set[str]) -> int:
        """A gate slot no living request holds (else one whose request is not in this step)."""
        used = set(self._ss_gslots.values())
        for k in range(1, sites.rows):
            if k not in used:
                return k
        for req, k in list(self._ss_gslots.items()):
            if req not in batch:
                del self._ss_gslots[req]
                self._ss_gdecided.pop(req, None)
                return k
        raise RuntimeError(f"steerscope: more than {sites.rows - 1} gated requests in one step")

    def _ss_build(self, specs: list[Spec | None], tok_req: torch.Tensor, is_gen: torch.Tensor,
                  device: torch.device) -> _Step:
        n, d = len(specs), self._ss_d_model
        layers = sorted({layer for s in specs if s for name, _ in s.vectors for layer in self._ss_vectors[name]})
        keep = torch.ones(n, 2)  # per request: multiplier for (prompt, generated) tokens
        for i, s in enumerate(specs):
            if s is not None:
                keep[i, 0] = float(s.positions in ("all", "prompt"))
                keep[i, 1] = float(s.positions in ("all", "generated"))
        tok_keep = keep[tok_req, is_gen.long()]  # [tokens]
        delta = {}
        for layer in layers:
            m = torch.zeros(n, d)
            for i, s in enumerate(specs):
                for name, alpha in (s.vectors if s else ()):
                    v = self._ss_vectors[name].get(layer)
                    if v is not None:
                        m[i] += alpha * v
            delta[layer] = (m[tok_req] * tok_keep[:, None]).to(device)
        ablate = None
        if any(s is not None and s.ablate for s in specs):
            r = torch.zeros(n, d)
            for i, s in enumerate(specs):
                if s is not None and s.ablate:
                    v = next(iter(self._ss_vectors[s.ablate].values()))
                    r[i] = v / v.norm().clamp_min(1e-30)  # zero stays zero: _project leaves the row alone
            ablate = r[tok_req].to(device)
        return _Step(delta, ablate)

    def _ss_layer_hook(self, layer: int) -> Any:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            step = self._ss_step
            if step is None:
                return None
            positions, hidden, residual = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("residual")
            self._ss_calls += 1
            hidden, residual = self._ss_steer(step, layer, hidden, residual, ablate=True)
            kwargs.pop("residual", None)
            return (positions, hidden, residual, *args[3:]), kwargs
        return hook

    def _ss_norm_hook(self, layer: int) -> Any:
        """The final norm's pre-hook: ``norm(hidden, residual)`` adds the two like a layer's input norm, so the
        delta of "layer n_layers" goes into ``residual`` (into ``hidden`` when the norm is called without one).
        No ablation here: resid_pre, attn_out and mlp_out of the last block are projected already."""
        def hook(module: Any, args: tuple[Any, ...]) -> Any:
            step = self._ss_step
            if step is None or not args:
                return None
            hidden, residual = args[0], args[1] if len(args) > 1 else None
            if layer in step.delta:
                self._ss_calls += 1
            hidden, residual = self._ss_steer(step, layer, hidden, residual, ablate=False)
            return (hidden,) if len(args) < 2 else (hidden, residual, *args[2:])
        return hook

    def _ss_steer(self, step: _Step, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None, ablate: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a steering pre-hook does to resid_pre (``hidden + residual``) of ``layer``: the step's delta into
        ``residual`` (``hidden`` where there is none), the ablation direction projected out (``ablate``), then the
        gated rows' rules and clamps."""
        d = step.delta.get(layer)
        if d is not None:
            if residual is None:
                hidden = _add(hidden, d.to(hidden.dtype))
            else:
                residual = _add(residual, d.to(residual.dtype))
            self._ss_stream = hidden if residual is None else residual  # for stats: no copy, no sync
        if ablate and step.ablate is not None:
            hidden = _project(hidden, step.ablate.to(hidden.dtype))
            if residual is not None:
                residual = _project(residual, step.ablate.to(residual.dtype))
        if step.rows:
            from steerscope_vllm_gates import apply_rows

            hidden, residual = apply_rows(step.rows, layer, hidden, residual, self._ss_vectors, self._ss_bad)
        return hidden, residual

    def _ss_out_hook(self, module: Any, args: Any, out: Any) -> Any:
        step = self._ss_step
        if step is None or step.ablate is None or not isinstance(out, torch.Tensor):
            return None
        return _project(out, step.ablate.to(out.dtype))
