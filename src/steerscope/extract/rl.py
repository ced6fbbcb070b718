"""RLOO: train a steering bias (or any small policy) with a verifiable reward.

Algorithm (REINFORCE leave-one-out, Ahmadian et al., 2024; the setting of Sinii et al., 2025,
"Small Vectors, Big Effects", arXiv 2509.06608 -- no KL term, no ratio clipping):
    1. Each step draws ``prompts_per_step`` training prompts (order fixed by the seed).
    2. For each prompt, ``k`` completions are sampled with ``model.generate`` (temperature 1,
       top-k / top-p off) while the policy is applied (steering hook / enabled adapter); each
       prompt is prefilled once and its KV cache repeated for its k rows.
    3. Rewards r_i = reward(prompt, completion, answer); leave-one-out advantages
       A_i = r_i - mean_{j≠i} r_j within each group of k.
    4. Log-probs log π(y_it) are recomputed in a teacher-forced pass with the trainable
       parameters in the graph (a prompt runs once, its KV cache shared by its k rows);
       loss = -Σ_i A_i Σ_t log π(y_it) / N, where N is the number of generated tokens in the
       batch (EOS included, padding excluded). Rows with A_i = 0 contribute nothing and are
       skipped (exactly).
    5. AdamW with linear warm-up then a constant learning rate; gradient-norm clipping.
    6. Every ``checkpoint_every`` steps the policy and optimizer tensors are saved as
       safetensors and the counters / history as JSON; :func:`train_rloo` resumes from there.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

from steerscope.analyses.trainable import frozen_except
from steerscope.errors import StudyError
from steerscope.extract.result import StepLog, TrainResult
from steerscope.generation import IGNORE, SeededSampler, position_ids, sequence_logprobs, summed_logprobs
from steerscope.models.load import LM
from steerscope.progress import progress

Reward = Callable[[str, str, str], float]


class Policy(Protocol):
    """What the trainer needs: trainable parameters and a context that applies them."""

    def parameters(self) -> Any: ...
    def named_parameters(self) -> Any: ...
    def active(self) -> ContextManager[Any]: ...


@dataclass(frozen=True)
class RLOOConfig:
    """Hyper-parameters of :func:`train_rloo` (defaults follow Sinii et al. where they apply)."""

    steps: int = 50
    prompts_per_step: int = 4
    k: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.03
    grad_clip: float = 2.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    micro_batch: int = 16
    checkpoint_every: int = 10
    seed: int = 0
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    """Earlier (user, assistant) chat turns before every prompt, e.g. few-shot worked examples (:meth:`LM.format_chat`)."""


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages A_i = r_i - mean_{j≠i} r_j per group.

    Args:
        rewards: [group k] (k ≥ 2).

    Returns:
        [group k].
    """
    k = rewards.shape[-1]
    if k < 2:
        raise StudyError("RLOO needs at least k=2 samples per prompt")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def completion_mask(gen: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """Which generated tokens count: everything up to and including the first EOS. [batch gen] bool."""
    is_eos = torch.zeros_like(gen, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= gen == e
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


def policy_logprobs(lm: LM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: torch.Tensor,
                    gen_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log π(y_t | prompt, y_<t) per row, teacher-forced (gradients flow to active parameters).

    Lays the sampled rows out as one batch for :func:`steerscope.generation.sequence_logprobs`.

    Args:
        prompt_ids, prompt_mask: left-padded prompts [batch P].
        gen, gen_mask: generated tokens and which of them count [batch T].

    Returns:
        [batch] summed log-probs of the counted tokens.
    """
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE), torch.where(gen_mask.bool(), gen, IGNORE)], 1)
    batch = {"input_ids": torch.cat([prompt_ids, gen], 1), "labels": labels,
             "attention_mask": torch.cat([prompt_mask, torch.ones_like(gen)], 1)}
    return sequence_logprobs(lm, batch)


def shared_prompt_logprobs(lm: LM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: torch.Tensor,
                           gen_mask: torch.Tensor) -> torch.Tensor:
    """:func:`policy_logprobs` for rows that all continue one prompt: the prompt runs once, its KV cache is
    repeated for the rows, and only the generated tokens run per row (gradients flow through the cache).

    With k samples of a long prompt (few-shot examples) this is about k times less work than laying every
    row out in full; the result is the same sum (equal up to float rounding).

    Args:
        prompt_ids, prompt_mask: the prompt, left-padded [P] (or [1 P]).
        gen, gen_mask: generated tokens of each row and which of them count [n T].

    Returns:
        [n] summed log-probs of the counted tokens.
    """
    keep = prompt_mask.reshape(-1).bool()
    p = prompt_ids.reshape(-1)[keep][None]  # [1 P]
    n, T, P = gen.shape[0], gen.shape[1], int(keep.sum())
    out, cache = _repeated_cache(lm, p, torch.ones_like(p), n)
    pos = (P + torch.arange(T, device=gen.device))[None].expand(n, T)
    mask = torch.ones(n, P + T, dtype=prompt_mask.dtype, device=gen.device)
    out2 = lm.model(input_ids=gen, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=T,
                    **{lm.cache_kw: cache})
    logits = torch.cat([out.logits[:, -1:].expand(n, 1, -1), out2.logits[:, :-1]], 1)  # [n T vocab]
    return summed_logprobs(logits, gen, gen_mask)


def surrogate_backward(lm: LM, policy: Policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       gen: torch.Tensor, gen_mask: torch.Tensor, adv: torch.Tensor, micro_batch: int = 16,
                       group: int = 1) -> float:
    """Accumulate ∇ of -Σ_i A_i Σ_t log π(y_it) / N into the policy's ``.grad``; return the loss value.

    Rows with A_i = 0 are skipped (their term is exactly zero); N counts every row's tokens. ``group`` = k
    when rows come in groups of k samples of one prompt (rows g*k .. g*k+k-1): each group's prompt then
    runs once (:func:`shared_prompt_logprobs`); ``micro_batch`` bounds the rows of one pass either way.
    """
    n_tok = float(gen_mask.sum().clamp(min=1))
    rows = torch.nonzero(adv != 0).flatten().tolist()
    if group > 1:
        if prompt_ids.shape[0] % group:
            raise ValueError(f"{prompt_ids.shape[0]} rows do not split into groups of {group}")
        chunks = [c[i:i + micro_batch] for g in range(0, prompt_ids.shape[0], group)
                  for c in [[r for r in rows if g <= r < g + group]] for i in range(0, len(c), micro_batch)]
    else:
        chunks = [rows[i : i + micro_batch] for i in range(0, len(rows), micro_batch)]
    total = 0.0
    with policy.active():
        for r in chunks:
            if group > 1:
                lp = shared_prompt_logprobs(lm, prompt_ids[r[0]], prompt_mask[r[0]], gen[r], gen_mask[r])
            else:
                lp = policy_logprobs(lm, prompt_ids[r], prompt_mask[r], gen[r], gen_mask[r])
            loss = -(adv[r].to(lp.dtype) * lp).sum() / n_tok
            loss.backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
    return total


def sample(lm: LM, policy: Policy, texts: list[str], k: int, max_new_tokens: int, temperature: float,
           seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """k sampled completions per text under the policy: (prompt_ids, prompt_mask, gen, gen_mask, completions).

    Sampling at ``temperature`` (top-k / top-p off) draws from a generator seeded with ``seed``
    (:class:`~steerscope.generation.SeededSampler`: the tokens of ``torch.manual_seed(seed)`` then HF
    sampling), so the global RNG is not touched. Each prompt is prefilled once and its KV cache repeated
    for its k rows; the batch is the same as without that, so are the draws.
    """
    from transformers import LogitsProcessorList

    enc = lm.tokenize([t for t in texts for _ in range(k)], padding_side="left")
    with policy.active(), torch.no_grad():
        ids = lm.model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                logits_processor=LogitsProcessorList([SeededSampler(temperature, seed)]),
                                pad_token_id=lm.tokenizer.pad_token_id, **_prefilled(lm, texts, k))
    P = enc["input_ids"].shape[1]
    gen = ids[:, P:]
    eos = lm.model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [lm.tokenizer.eos_token_id])
    gmask = completion_mask(gen, eos_ids)
    texts_out = [lm.tokenizer.decode(g[m], skip_special_tokens=True) for g, m in zip(gen, gmask)]
    return enc["input_ids"], enc["attention_mask"], gen, gmask, texts_out


def _prefilled(lm: LM, texts: list[str], k: int) -> dict[str, Any]:
    """``generate``'s cache argument holding every prompt but its last token, each prompt run once and its
    cache repeated for its k rows (the rows of ``texts`` x k, left-padded alike); {} when there is nothing
    to share. Call it with the policy active: the cached positions are steered as a full prefill's are."""
    enc = lm.tokenize(texts, padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if k < 2 or ids.shape[1] < 2:
        return {}
    return {lm.cache_kw: _repeated_cache(lm, ids[:, :-1], mask[:, :-1], k)[1]}


def _repeated_cache(lm: LM, ids: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[Any, Any]:
    """One forward of the (left-padded) prompts [batch P] with positions from the mask; returns its output
    (last-position logits only) and its KV cache with each row repeated k times ([batch*k ...])."""
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
    cache = lm.cache_of(out)
    cache.batch_repeat_interleave(k)
    return out, cache


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(folder: Path, policy: Policy, opt: torch.optim.Optimizer, step: int,
                    history: list[StepLog], config: RLOOConfig) -> None:
    """Write policy.safetensors, optim.safetensors and state.json (atomically, state last): each through
    :func:`steerscope._files.atomic_write` (a unique temp file, renamed; a symlink in the way is replaced,
    never written through)."""
    from safetensors.torch import save

    from steerscope._files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    pol = {n: p.detach().cpu().contiguous() for n, p in policy.named_parameters()}
    names = {id(p): n for n, p in policy.named_parameters()}
    optt, steps = {}, {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for key in ("exp_avg", "exp_avg_sq"):
            optt[f"{n}::{key}"] = st[key].detach().cpu().contiguous()
        steps[n] = float(st["step"])
    for name, tensors in (("policy", pol), ("optim", optt)):
        atomic_write(folder / f"{name}.safetensors", save(tensors))
    state = {"step": step, "config": asdict(config), "adam_steps": steps, "history": [asdict(h) for h in history]}
    atomic_write(folder / "state.json", json.dumps(state).encode())


def load_checkpoint(folder: Path, policy: Policy, opt: torch.optim.Optimizer) -> tuple[int, list[StepLog]]:
    """Restore a checkpoint written by :func:`save_checkpoint`; (0, []) when there is none."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        return 0, []
    state = json.loads((folder / "state.json").read_text())
    pol = load_file(str(folder / "policy.safetensors"))
    optt = load_file(str(folder / "optim.safetensors"))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n not in pol:
                raise StudyError(f"checkpoint {folder} does not match this policy (no {n}); use a new folder")
            p.copy_(pol[n].to(p.device, p.dtype))
            if f"{n}::exp_avg" in optt:
                opt.state[p] = {"step": torch.tensor(state["adam_steps"][n]),
                                "exp_avg": optt[f"{n}::exp_avg"].to(p.device),
                                "exp_avg_sq": optt[f"{n}::exp_avg_sq"].to(p.device)}
    return int(state["step"]), [StepLog(**h) for h in state["history"]]


def _lr_factor(step: int, total: int, warmup_frac: float) -> float:
    warm = max(1, math.ceil(warmup_frac * total))
    return min(1.0, (step + 1) / warm)


def train_rloo(lm: LM, policy: Policy, prompts: Sequence[str], answers: Sequence[str], reward: Reward,
               config: RLOOConfig = RLOOConfig(), checkpoint_dir: str | Path | None = None,
               show_progress: bool = True, on_step: Callable[[StepLog], None] | None = None) -> TrainResult:
    """Train ``policy`` with RLOO on (prompt, answer) pairs; resume from ``checkpoint_dir`` if present.

    Args:
        lm: the model (its weights are frozen here).
        policy: e.g. :class:`steerscope.analyses.trainable.SteeringBias`.
        prompts, answers: training problems (prompts get the chat template).
        reward: ``reward(prompt, completion, answer) -> float``.
        config: :class:`RLOOConfig`.
        checkpoint_dir: folder for periodic checkpoints (and resume).

    Returns:
        :class:`TrainResult` with one :class:`StepLog` per step (resumed steps included).

    Example:
        >>> bias = SteeringBias(lm, [29])
        >>> res = train_rloo(lm, bias, prompts, answers, math_reward, RLOOConfig(steps=20, k=8))
        >>> vec = bias.vector()
    """
    if len(prompts) != len(answers) or not prompts:
        raise StudyError("give as many answers as prompts, and at least one prompt")
    params = [p for p in policy.parameters()]
    with frozen_except(lm.model, params):
        return _rloo_loop(lm, policy, prompts, answers, reward, config, checkpoint_dir, show_progress, on_step, params)


def _rloo_loop(lm: LM, policy: Policy, prompts: Sequence[str], answers: Sequence[str], reward: Reward,
               config: RLOOConfig, checkpoint_dir: str | Path | None, show_progress: bool,
               on_step: Callable[[StepLog], None] | None, params: list[torch.nn.Parameter]) -> TrainResult:
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, history = load_checkpoint(ckpt, policy, opt) if ckpt is not None else (0, [])
    n_trainable = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    need = config.steps * config.prompts_per_step
    while len(order) < need:
        order += torch.randperm(len(prompts), generator=gen).tolist()
    texts = [lm.format_chat(p, config.system, history=config.history) for p in prompts]
    t_all = time.time()
    bar = progress(range(start, config.steps), desc="rloo", enabled=show_progress, total=config.steps - start)
    for step in bar:
        t0 = time.time()
        idx = order[step * config.prompts_per_step : (step + 1) * config.prompts_per_step]
        pid, pmask, g, gmask, comps = sample(lm, policy, [texts[i] for i in idx], config.k, config.max_new_tokens,
                                             config.temperature, seed=config.seed * 1_000_003 + step)
        r = torch.tensor([reward(prompts[i], comps[j * config.k + m], answers[i])
                          for j, i in enumerate(idx) for m in range(config.k)], dtype=torch.float32)
        adv = rloo_advantages(r.view(-1, config.k)).flatten()
        for pg in opt.param_groups:
            pg["lr"] = config.lr * _lr_factor(step, config.steps, config.warmup_frac)
        opt.zero_grad(set_to_none=True)
        loss = surrogate_backward(lm, policy, pid, pmask, g, gmask, adv.to(lm.device), config.micro_batch,
                                  group=config.k)
        gn = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip)) if any(p.grad is not None for p in params) else 0.0
        if any(p.grad is not None for p in params):
            opt.step()
        log = StepLog(step, float(r.mean()), float((r > 0).float().mean()), loss, gn,
                      float(gmask.sum(1).float().mean()), int((adv != 0).sum()), round(time.time() - t0, 2))
        history.append(log)
        if on_step is not None:
            on_step(log)
        if hasattr(bar, "set_postfix"):
            recent = history[-10:]
            bar.set_postfix(reward=f"{sum(h.reward for h in recent) / len(recent):.3f}")
        if ckpt is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            save_checkpoint(ckpt, policy, opt, step + 1, history, config)
    return TrainResult(history=history, n_trainable=n_trainable, seconds=round(time.time() - t_all, 2),
                       resumed_from=start)
