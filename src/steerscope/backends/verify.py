"""Does a vector file mean the same on every engine? Greedy tokens and logit deltas against the HF path.

1. The plan: the file's declared use (its provenance ``use`` record: operation, site, layers, positions,
   recommended alpha), ``alpha`` overriding the record's; a file without a record needs ``alpha`` and is then
   added at all its layers and every position (:func:`plan_for`).
2. The reference: each prompt (chat template applied, token ids from the LM's tokenizer, the same ids for
   every engine) is decoded greedily by Hugging Face ``generate`` under the plan's intervention
   (:func:`steerscope.steering`, :func:`~steerscope.ablation` or :func:`~steerscope.clamping`), one prompt a
   call (no padding), cut after the first EOS.
3. Each other backend: skipped when it is not installed (the reason names the install command), refused in one
   line when it cannot honour the plan, else run on the same ids: vLLM (``backends.vllm``: additions at
   resid_pre (mlp_out / resid_post moved up a layer) over all / prompt / generated positions, and directional
   ablation) and llama.cpp (``backends.llamacpp``: the file exported as a control vector; additions to the
   residual stream at every position).
4. Per prompt: identical tokens, or the index of the first differing token; where the backend gives logits
   cheaply (llama.cpp), the steering delta of the next-token logits (steered minus unsteered) against HF's:
   ``|d_backend - d_hf| / |d_hf|``. A backend agrees when every prompt is identical and its worst delta error is
   at most ``delta_tol``.
5. Whether the check says anything: HF's unsteered greedy tokens too, and ``changed`` counts the prompts whose
   steered tokens differ from them. Agreement on prompts the plan does not change is agreement of the unsteered
   model; when ``changed`` is 0 the result says so (:meth:`VerifyResult.vacuous`) and the command warns.

Example:
    >>> res = verify(lm, ss.SteeringVector.load("tuned.safetensors"), ["hf", "vllm", "llamacpp"])
    >>> res.ok, [(b.backend, b.status) for b in res.backends]
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from steerscope.analyses.records import Record
from steerscope.errors import BackendError, VectorError
from steerscope.models.lm import LM
from steerscope.vector import SteeringVector, check_finite

VERIFY_BACKENDS = ("hf", "vllm", "llamacpp")
N_PROMPTS = 6  # shipped neutral prompts used when none are given


@dataclass(frozen=True)
class Plan(Record):
    """What is applied: ``operation`` at ``site`` of ``layers`` over ``positions`` with ``alpha`` (the clamp value
    for clamp; unused by ablate); ``source``: where alpha came from (``use record`` or ``argument``)."""

    operation: str
    site: str
    layers: list[int]
    positions: str | list[int]
    alpha: float | None
    source: str


@dataclass(frozen=True)
class PromptCheck(Record):
    """One prompt on one backend: ``identical`` greedy tokens, else ``first_diff`` (the first differing token's
    index); ``n_tokens``: HF's token count; ``delta_rel_err``: the logit-delta error (None: not measured)."""

    identical: bool
    first_diff: int | None
    n_tokens: int
    delta_rel_err: float | None = None


@dataclass(frozen=True)
class BackendResult(Record):
    """One backend's verdict: ``status`` is ``reference`` (hf), ``agree``, ``DIFFER``, ``skipped``, ``refused`` or
    ``failed``; ``reason`` says why for the last three; ``prompts``: one :class:`PromptCheck` per prompt when run."""

    backend: str
    status: str
    reason: str | None = None
    prompts: list[PromptCheck] = field(default_factory=list)

    @property
    def identical(self) -> int:
        return sum(p.identical for p in self.prompts)

    @property
    def first_differing_prompt(self) -> int | None:
        return next((i for i, p in enumerate(self.prompts) if not p.identical), None)

    @property
    def delta_rel_err(self) -> float | None:
        errs = [p.delta_rel_err for p in self.prompts if p.delta_rel_err is not None]
        return max(errs) if errs else None


@dataclass(frozen=True)
class VerifyResult(Record):
    """Every backend's :class:`BackendResult` for one vector on one model; ``ok``: every backend that ran agrees."""

    model: str
    plan: Plan
    prompts: list[str]
    max_new_tokens: int
    delta_tol: float
    backends: list[BackendResult]
    changed: int | None = None  # prompts whose HF steered tokens differ from HF's unsteered ones

    @property
    def vacuous(self) -> bool:
        """True when the plan changes no prompt's greedy tokens on HF: token agreement then says nothing."""
        return self.changed == 0

    @property
    def ok(self) -> bool:
        return all(b.status in ("reference", "agree", "skipped", "refused") for b in self.backends)

    def failure(self) -> str | None:
        """One line naming the first backend that does not agree and its first differing prompt; None when ok."""
        for b in self.backends:
            if b.status == "failed":
                return f"{b.backend} failed: {b.reason}"
            if b.status == "DIFFER":
                i = b.first_differing_prompt
                if i is None:
                    return (f"{b.backend} DIFFERS from hf: tokens identical on all {len(b.prompts)} prompts but "
                            f"the logit-delta error {b.delta_rel_err:.3g} exceeds {self.delta_tol:g}")
                p = b.prompts[i]
                return (f"{b.backend} DIFFERS from hf at prompt {i} ({self.prompts[i][:60]!r}): first "
                        f"differing token {p.first_diff} of {p.n_tokens}")
        return None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for b, d in zip(self.backends, out["backends"]):
            d.update(identical=b.identical, n=len(b.prompts), first_differing_prompt=b.first_differing_prompt,
                     delta_rel_err=b.delta_rel_err)
        out["ok"], out["vacuous"] = self.ok, self.vacuous
        return out


def plan_for(vector: SteeringVector, alpha: float | None = None) -> Plan:
    """The declared use of ``vector`` (its ``use`` record), ``alpha`` overriding the recommended one.

    Raises:
        VectorError: no use record (or one without alpha) and no ``alpha``; a record naming layers the vector
            lacks; an ablation of several directions.
    """
    use = vector.provenance.use
    if alpha is not None:
        check_finite(float(alpha), "alpha")
    if use is None:
        if alpha is None:
            raise VectorError("this vector file has no use record (no recommended alpha); pass --alpha "
                              "(alpha=...) to verify it as an addition at all its layers and positions")
        return Plan("add", vector.site, vector.layers, "all", float(alpha), "argument")
    if use.alpha is None and alpha is None and use.operation != "ablate":
        raise VectorError("this vector's use record has no recommended alpha; pass --alpha (alpha=...)")
    if use.site != vector.site:
        raise VectorError(f"the use record names site {use.site} but the vector is at {vector.site}; re-save it")
    layers = use.layers or vector.layers
    lacking = [k for k in layers if k not in vector]
    if lacking:
        raise VectorError(f"the use record names layers {lacking} that this vector lacks; re-save it")
    if use.operation == "ablate" and len(layers) != 1:
        raise VectorError(f"an ablation takes one direction; the use record names layers {layers}")
    a = float(alpha) if alpha is not None else use.alpha
    return Plan(use.operation, use.site, list(layers), use.positions, a, "argument" if alpha is not None else "use record")


def _selected(vector: SteeringVector, plan: Plan) -> SteeringVector:
    return SteeringVector({k: vector[k] for k in plan.layers}, vector.site, vector.provenance)


def hf_context(lm: LM, vector: SteeringVector, plan: Plan) -> AbstractContextManager[Any]:
    """The plan's intervention on the HF model."""
    from steerscope.steer import ablation, clamping, steering

    vec = _selected(vector, plan)
    if plan.operation == "ablate":
        if plan.positions != "all":
            raise VectorError(f"directional ablation applies at every position; the use record says {plan.positions}")
        return ablation(lm, vec)
    assert plan.alpha is not None
    if plan.operation == "clamp":
        return clamping(lm, vec, plan.alpha, plan.positions)
    return steering(lm, vec, alpha=plan.alpha, positions=plan.positions)


def eos_ids(lm: LM) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    return set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def cut(tokens: Sequence[int], eos: set[int]) -> list[int]:
    """``tokens`` up to and including the first EOS."""
    out = [int(t) for t in tokens]
    return out[:next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]


def first_diff(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The index of the first differing token (the shorter length when one is a prefix); None when identical."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_tokens(lm: LM, vector: SteeringVector, plan: Plan, ids: Sequence[Sequence[int]], n_new: int,
              steered: bool = True) -> list[list[int]]:
    """HF greedy tokens per prompt under the plan (``steered=False``: without it), one prompt a call, cut after
    the first EOS."""
    eos, out = eos_ids(lm), []
    for row in ids:
        x = torch.tensor([list(row)], device=lm.device)
        with torch.no_grad(), hf_context(lm, vector, plan) if steered else nullcontext():
            gen = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        out.append(cut(gen[0, x.shape[1]:].tolist(), eos))
    return out


def hf_deltas(lm: LM, vector: SteeringVector, plan: Plan, ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """HF's steering delta of the next-token logits per prompt (steered minus unsteered), float32 [vocab]."""
    out = []
    for row in ids:
        x = torch.tensor([list(row)], device=lm.device)
        with torch.no_grad():
            base = lm.model(input_ids=x).logits[0, -1].float()
            with hf_context(lm, vector, plan):
                steered = lm.model(input_ids=x).logits[0, -1].float()
        out.append((steered - base).cpu())
    return out


def rel_err(d: torch.Tensor, ref: torch.Tensor) -> float:
    """``|d - ref| / |ref|`` (0 when both are zero)."""
    num, den = float((d - ref).norm()), float(ref.norm())
    return 0.0 if num == 0 else num / den if den > 0 else float("inf")


def compare(name: str, ref: list[list[int]], got: list[list[int]], errs: Sequence[float | None] | None,
            delta_tol: float) -> BackendResult:
    """A backend's :class:`BackendResult` from its tokens (and delta errors) against HF's."""
    checks = [PromptCheck(first_diff(r, g) is None, first_diff(r, g), len(r), None if errs is None else errs[i])
              for i, (r, g) in enumerate(zip(ref, got, strict=True))]
    worst = max((c.delta_rel_err for c in checks if c.delta_rel_err is not None), default=0.0)
    agree = all(c.identical for c in checks) and worst <= delta_tol
    return BackendResult(name, "agree" if agree else "DIFFER", None, checks)


def vllm_refusal(lm: LM, vector: SteeringVector, plan: Plan) -> str | None:
    """Why the vLLM backend cannot honour the plan (one line), or None."""
    from steerscope.backends.vllm import POSITIONS, as_resid_pre

    if plan.operation == "clamp":
        return "the vLLM backend adds vectors and ablates directions; it cannot clamp"
    if plan.operation == "add":
        if not isinstance(plan.positions, str) or plan.positions not in POSITIONS:
            return f"the vLLM backend steers positions {', '.join(POSITIONS)}; this file's positions are {plan.positions}"
        if as_resid_pre(_selected(vector, plan), lm.n_layers) is None:
            return (f"the vLLM backend steers resid_pre (and mlp_out / resid_post, moved up one "
                    f"layer); this file is at {plan.site} of layers {plan.layers}")
    return None


def run_vllm(lm: LM, vector: SteeringVector, plan: Plan, ids: Sequence[Sequence[int]], n_new: int) -> list[list[int]]:
    """vLLM's greedy tokens per prompt under the plan (one engine call), cut after the first EOS."""
    from steerscope.backends import vllm as bv

    eng = bv.engine_for(lm)
    vec = _selected(vector, plan)
    if plan.operation == "ablate":
        s = bv.spec(eng, None, ablate=vec)
    else:
        assert plan.alpha is not None and isinstance(plan.positions, str)
        s = bv.spec(eng, bv.as_resid_pre(vec, lm.n_layers), plan.alpha, plan.positions)
    toks, _ = eng.generate_ids(ids, [s] * len(ids), bv.stop_params(lm, n_new, False, 1.0, None))
    eos = eos_ids(lm)
    return [cut(t, eos) for t in toks]


def _vllm(lm: LM, vector: SteeringVector, plan: Plan, ids: Sequence[Sequence[int]], n_new: int,
          ref: list[list[int]], delta_tol: float) -> BackendResult:
    from steerscope.backends.vllm import engine_python

    if engine_python(required=False) is None:
        return BackendResult("vllm", "skipped", "no vLLM engine environment; install it: steerscope vllm-setup "
                             "(or point STEERSCOPE_VLLM_ENV at one)")
    why = vllm_refusal(lm, vector, plan)
    if why is not None:
        return BackendResult("vllm", "refused", why)
    return compare("vllm", ref, run_vllm(lm, vector, plan, ids, n_new), None, delta_tol)


def _llamacpp(lm: LM, vector: SteeringVector, plan: Plan, ids: Sequence[Sequence[int]], n_new: int,
              ref: list[list[int]], delta_tol: float) -> BackendResult:
    from steerscope.backends import llamacpp

    why = llamacpp.missing(lm)
    if why is not None:
        return BackendResult("llamacpp", "skipped", why)
    why = llamacpp.refusal(plan.operation, plan.site, plan.layers, plan.positions)
    if why is not None:
        return BackendResult("llamacpp", "refused", why)
    assert plan.alpha is not None
    out = llamacpp.run(lm, _selected(vector, plan), plan.alpha, ids, n_new)
    eos = eos_ids(lm)
    got = [cut(t[:n_new], eos) for t in out.tokens]
    errs = [rel_err(torch.from_numpy(s - b), d)
            for s, b, d in zip(out.steered, out.base, hf_deltas(lm, vector, plan, ids), strict=True)]
    return compare("llamacpp", ref, got, errs, delta_tol)


def verify(lm: LM, vector: SteeringVector, backends: Sequence[str] = VERIFY_BACKENDS,
           prompts: Sequence[str] | None = None, alpha: float | None = None, max_new_tokens: int = 32,
           delta_tol: float = 0.05) -> VerifyResult:
    """Apply the vector file's declared use on each backend and compare with the HF path (module docstring).

    Args:
        lm: the model (float32 for exact agreement).
        vector: the vector; its provenance ``use`` record says how it is applied.
        backends: from ``hf``, ``vllm``, ``llamacpp`` (hf, the reference, always runs).
        prompts: user messages (chat template applied); default: the first shipped neutral prompts.
        alpha: overrides the recommended alpha (required when the file has no use record).
        max_new_tokens: greedy tokens per prompt.
        delta_tol: the largest logit-delta relative error a backend may have and still agree.

    Returns:
        A :class:`VerifyResult`; ``.ok`` is False when a backend that ran differs or failed.

    Example:
        >>> verify(lm, vec, ["hf", "llamacpp"], alpha=4.0).failure()  # None when they agree
    """
    from steerscope.backends.vllm import prompt_ids
    from steerscope.data import neutral_prompts

    bad = [b for b in backends if b not in VERIFY_BACKENDS]
    if bad:
        raise BackendError(f"backend(s) {bad} not known; choose from {', '.join(VERIFY_BACKENDS)}")
    plan = plan_for(vector, alpha)
    vector.check_compatible(lm)
    texts = list(prompts) if prompts is not None else neutral_prompts(N_PROMPTS)
    ids = prompt_ids(lm, [lm.format_chat(p) for p in texts], templated=True)
    ref = hf_tokens(lm, vector, plan, ids, max_new_tokens)
    changed = sum(first_diff(r, u) is not None
                  for r, u in zip(ref, hf_tokens(lm, vector, plan, ids, max_new_tokens, steered=False), strict=True))
    out = [BackendResult("hf", "reference", None, [PromptCheck(True, None, len(r)) for r in ref])]
    for name, fn in (("vllm", _vllm), ("llamacpp", _llamacpp)):
        if name in backends:
            try:
                out.append(fn(lm, vector, plan, ids, max_new_tokens, ref, delta_tol))
            except BackendError as e:
                out.append(BackendResult(name, "failed", " ".join(str(e).split())[:300]))
    return VerifyResult(lm.name, plan, texts, max_new_tokens, delta_tol, out, changed)
