"""The resumable steps of the reasoning study; each returns a typed record (:mod:`.records`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from itertools import combinations
from typing import Any, Callable, ContextManager, Sequence

import torch

from steerscope.analyses.lens import logit_lens
from steerscope.analyses.trainable import LoRAPolicy, SteeringBias
from steerscope.backends import vllm as bv
from steerscope.backends.base import Addition, Request
from steerscope.backends.hf import HFEngine
from steerscope.extract.result import StepLog
from steerscope.extract.rl import RLOOConfig, train_rloo
from steerscope.generation import RowSeededSampler, generate_batch
from steerscope.metrics.math import is_correct, math_reward
from steerscope.models.load import LM, load_model
from steerscope.runs import Run, save_tensors
from steerscope.steer import steering
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import (
    ControlRecord,
    EvalRecord,
    HistoryRow,
    LensRecord,
    LensRow,
    LoraRecord,
    PairRow,
    PairsRecord,
    TrainRecord,
)
from steerscope.studies.reasoning.task import Problem, examples, split
from steerscope.vector import SteeringVector


def problems(cfg: ReasoningConfig) -> tuple[list[Problem], list[Problem]]:
    """The train and test problems of ``cfg`` (its difficulty and seed).

    Example:
        >>> train, test = problems(ReasoningConfig(n_train=10, n_test=5))
    """
    return split(cfg.n_train, cfg.n_test, cfg.difficulty, cfg.seed)


def shots(cfg: ReasoningConfig) -> tuple[tuple[str, str], ...]:
    """The ``cfg.shots`` worked examples (prompt, solution) shown before every problem, disjoint from the
    train and test problems (:func:`task.examples`); empty when ``shots`` is 0."""
    if not cfg.shots:
        return ()
    train, test = problems(cfg)
    return tuple(examples(cfg.shots, cfg.difficulty, cfg.seed, {p.question for p in [*train, *test]}))


def chat_texts(lm: LM, cfg: ReasoningConfig, probs: Sequence[Problem]) -> list[str]:
    """The problems as the model sees them: chat template, ``cfg.system``, the few-shot turns, the prompt.

    Example:
        >>> chat_texts(lm, ReasoningConfig(shots=2, difficulty="multi-2-tiny"), problems(cfg)[1][:3])
    """
    history = shots(cfg)
    return [lm.format_chat(p.prompt, cfg.system, history=history) for p in probs]


Steer = SteeringVector | Callable[[], ContextManager[Any]] | None
"""How generations are steered: a vector added at alpha 1 (either backend), a context factory such as
a gated bias's or the LoRA policy's ``active`` (HF only), or None (unsteered)."""


def on_vllm(lm: LM, steer: Steer, backend: str) -> bool:
    """Whether ``backend`` is vllm and the engine can apply ``steer`` (unsteered, or a vector it can move to resid_pre)."""
    if backend != "vllm":
        return False
    return steer is None or (isinstance(steer, SteeringVector) and bv.as_resid_pre(steer, lm.n_layers) is not None)


def requests(texts: Sequence[str], steer: Steer, max_new_tokens: int, do_sample: bool, seed: int,
             chunk: int) -> list[Request]:
    """Requests for chat-formatted ``texts``: greedy, or sampled at T = 1 with seed ``seed + i`` for the
    ``chunk`` texts from the i-th on (the study's seeds per batch of 50 on HF; one seed for all on vLLM)."""
    iv = Addition(steer, 1.0) if isinstance(steer, SteeringVector) else steer
    return [Request(t, iv, template="applied", max_new_tokens=max_new_tokens, do_sample=do_sample,
                    seed=seed + i - i % chunk) for i, t in enumerate(texts)]


def _generate(lm: LM, texts: Sequence[str], steer: Steer, max_new_tokens: int, do_sample: bool, seed: int,
              batch_size: int = 50, backend: str = "hf") -> list[str]:
    """Completions of chat-formatted ``texts``: greedy, or sampled at T = 1 (HF: seed + i per batch from text i).

    On ``backend="vllm"`` where :func:`on_vllm` says so (same greedy tokens; vLLM's own sampler, one
    seed per text derived from ``seed``); on the HF engine otherwise, with the context factory if any.
    """
    if on_vllm(lm, steer, backend):
        return bv.VLLMEngine().generate(lm, requests(texts, steer, max_new_tokens, do_sample, seed, max(len(texts), 1)))
    return HFEngine(batch_size).generate(lm, requests(texts, steer, max_new_tokens, do_sample, seed, batch_size))


def sample_seed(seed: int, problem: int, sample: int) -> int:
    """The seed of sample ``sample`` of test problem ``problem`` (one generator per row: batch-invariant)."""
    return (seed * 1_000_003 + problem) * 1_009 + sample + 1


def _steer_context(lm: LM, steer: Steer) -> ContextManager[Any]:
    if isinstance(steer, SteeringVector):
        return steering(lm, steer, 1.0)
    return steer() if steer is not None else nullcontext()


def sample_rows(lm: LM, texts: Sequence[str], steer: Steer, max_new_tokens: int, seeds: Sequence[int],
                batch_size: int = 50, backend: str = "hf") -> list[str]:
    """One completion at T = 1 per text, text j drawn from its own generator seeded ``seeds[j]``.

    On HF every batch row has its own generator (:class:`~steerscope.generation.RowSeededSampler`),
    so a row's tokens do not depend on the batch; on vLLM all rows go in one call seeded ``seeds[0]``, where
    the engine gives each row its own seed (``backends.vllm.row_seeds``; vLLM's sampler, not HF's).
    """
    if on_vllm(lm, steer, backend):
        return bv.VLLMEngine().generate(lm, requests(texts, steer, max_new_tokens, True, seeds[0] if seeds else 0,
                                                     max(len(texts), 1)))
    out: list[str] = []
    for i in range(0, len(texts), batch_size):
        sampler = RowSeededSampler(1.0, seeds[i: i + batch_size])
        out += generate_batch(lm, texts[i: i + batch_size], True, max_new_tokens, [sampler], _steer_context(lm, steer))
    return out


def evaluate(lm: LM, test: Sequence[Problem], cfg: ReasoningConfig, name: str, steer: Steer = None,
             prefix: str = "", samples: int | None = None) -> EvalRecord:
    """Greedy accuracy and ``samples`` (default ``eval_samples``) samples at T = 1 per problem on the test set.

    The sampled outcomes are stored sample-major (``sampled[r * n + i]`` is sample r of problem i), each
    drawn with :func:`sample_seed` ``(cfg.seed, i, r)``; pass@1 = their mean (:class:`analyses.EvalResult`).
    ``steer``: a vector at alpha 1, a context factory, or None (:data:`Steer`); generated on ``cfg.backend``
    where the engine can apply it.
    """
    texts = [t + prefix for t in chat_texts(lm, cfg, test)]
    greedy = [prefix + c for c in _generate(lm, texts, steer, cfg.max_new_tokens, False, cfg.seed, backend=cfg.backend)]
    g = [int(is_correct(c, p.answer)) for c, p in zip(greedy, test)]
    k = cfg.eval_samples if samples is None else samples
    rows = [(r, i) for r in range(k) for i in range(len(test))]
    comp = sample_rows(lm, [texts[i] for _, i in rows], steer, cfg.max_new_tokens,
                       [sample_seed(cfg.seed, i, r) for r, i in rows], backend=cfg.backend)
    s = [int(is_correct(prefix + c, test[i].answer)) for c, (_, i) in zip(comp, rows)]
    return an.EvalResult(name, g, s, [f"{p.prompt} -> {c!r}" for p, c in zip(test, greedy)], k).summary()


def _rloo_cfg(cfg: ReasoningConfig, lr: float, seed: int | None = None) -> RLOOConfig:
    return RLOOConfig(steps=cfg.steps, prompts_per_step=cfg.prompts_per_step, k=cfg.k, lr=lr,
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, checkpoint_every=2,
                      seed=cfg.seed if seed is None else seed, system=cfg.system, history=shots(cfg))


def train_vector(run: Run, lm: LM, cfg: ReasoningConfig, name: str, layers: list[int] | str,
                 train_seed: int | None = None, gate: bool | None = None) -> TrainRecord:
    """Train a steering bias with RLOO (checkpointed under ckpt/<name>); save vectors/<name>.safetensors.

    ``train_seed`` (default ``cfg.seed``) seeds the sampling and prompt order only: the problems are
    always those of ``cfg.seed``. ``gate`` (default ``cfg.gate``) adds the adaptive per-token scale.
    """
    train, _ = problems(cfg)
    bias = SteeringBias(lm, layers, gate=cfg.gate if gate is None else gate)
    res = train_rloo(lm, bias, [p.prompt for p in train], [p.answer for p in train], math_reward,
                     _rloo_cfg(cfg, cfg.lr, train_seed), checkpoint_dir=run.path("ckpt", name, "x").parent)
    vec = bias.vector(train_steps=cfg.steps, difficulty=cfg.difficulty, k=cfg.k, lr=cfg.lr,
                      **({"shots": cfg.shots} if cfg.shots else {}))  # trained on prompts after that many examples
    vec.save(run.path("vectors", f"{name}.safetensors"))
    if bias.gated:  # the gate is not part of a SteeringVector: keep the whole policy beside it (atomically)
        save_tensors(run.path("vectors", f"{name}.policy.safetensors"), dict(bias.named_parameters()))
    return TrainRecord(name, list(bias.layers), res.n_trainable, res.seconds, _history(res.history),
                       {str(k): v for k, v in vec.norms().items()}, res.resumed_from)


def _history(log: Sequence[StepLog]) -> list[HistoryRow]:
    """The trainer's step log as records (each step's fields as they are)."""
    return [HistoryRow(**h.__dict__) for h in log]


def load_vector(run: Run, name: str) -> SteeringVector:
    """The trained vector ``name`` of the run (``vectors/<name>.safetensors``)."""
    return SteeringVector.load(run.path("vectors", f"{name}.safetensors"))


def train_and_eval_lora(run: Run, cfg: ReasoningConfig, device: str) -> LoraRecord:
    """The LoRA baseline: same trainer and budget, on its own copy of the model; evaluated at the end."""
    lm = load_model(cfg.model, device=device, dtype=cfg.dtype)
    train, test = problems(cfg)
    pol = LoRAPolicy(lm, r=cfg.lora_rank, seed=cfg.seed)
    res = train_rloo(lm, pol, [p.prompt for p in train], [p.answer for p in train], math_reward,
                     _rloo_cfg(cfg, cfg.lora_lr), checkpoint_dir=run.path("ckpt", "lora", "x").parent)
    ev = evaluate(lm, test, cfg, "LoRA", pol.active)
    return LoraRecord("lora", res.n_trainable, res.seconds, _history(res.history), ev, res.resumed_from)


def lens_step(lm: LM, vecs: dict[str, SteeringVector], k: int = 10) -> LensRecord:
    """The top ``k`` logit-lens tokens of each vector at each of its layers, without and with the final norm.

    Example:
        >>> lens_step(lm, {"L28": vec}).rows[0].tokens
    """
    rows = []
    for name, v in vecs.items():
        for layer in v.layers:
            for fn in (False, True):
                top = logit_lens(lm, v[layer][None].to(lm.device), k=k, final_norm=fn)[0]
                rows.append(LensRow(name, layer, fn, list(top.tokens), [round(x, 3) for x in top.scores]))
    return LensRecord(rows)


def analysis_texts(lm: LM, cfg: ReasoningConfig, vec: SteeringVector) -> tuple[list[str], list[str], list[Problem]]:
    """Prompts of the first ``n_analysis`` test problems and the steered model's greedy completions."""
    _, test = problems(cfg)
    test = test[: cfg.n_analysis]
    texts = chat_texts(lm, cfg, test)
    comps = _generate(lm, texts, vec, cfg.max_new_tokens, False, cfg.seed, backend=cfg.backend)
    return texts, [c if c else " " for c in comps], test


def pairs_step(lm: LM, run: Run, cfg: ReasoningConfig, singles: list[int], acc: dict[str, float]) -> PairsRecord:
    """Per pair of single layers: the two independently trained vectors applied together and, with
    ``cfg.joint_pairs``, a pair trained jointly (``vectors/pair_L<a>_L<b>``, paper B's setting); the
    layer-pair gain (acc_pair - max single) / (acc_all - max single) of each (needs the all-layers vector)."""
    _, test = problems(cfg)
    out = []
    for a, b in combinations(singles, 2):
        na, nb = rc.vector_name(a), rc.vector_name(b)
        row = PairRow([a, b], evaluate(lm, test, cfg, f"{na}+{nb}", load_vector(run, na) + load_vector(run, nb)))
        if cfg.joint_pairs:
            name = rc.pair_name(a, b)
            row = replace(row, joint_train=train_vector(run, lm, cfg, name, [a, b]),
                          joint_eval=evaluate(lm, test, cfg, name, load_vector(run, name)))
        if "all" in acc:
            def gain(ev: EvalRecord | None) -> float | None:
                return None if ev is None else an.layer_pair_gain(ev.greedy_acc, acc[na], acc[nb], acc["all"])

            row = replace(row, gain=gain(row.eval), joint_gain=gain(row.joint_eval))
        out.append(row)
    return PairsRecord(out)


def random_control(lm: LM, cfg: ReasoningConfig, vec: SteeringVector, layer: int) -> ControlRecord:
    """A random direction with the trained vector's norm at the same layer, evaluated like the vector."""
    _, test = problems(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    r = torch.randn(lm.d_model, generator=g)
    rv = SteeringVector({layer: r / r.norm() * vec[layer].norm()}, "mlp_out")
    ev = evaluate(lm, test, cfg, f"random L{layer}", rv)
    return ControlRecord(layer, float(vec[layer].norm()), ev)
