"""The refusal model organism ``smollm2-135m-safe``: a LoRA safety fine-tune of SmolLM2-135M-Instruct.

SmolLM2-135M-Instruct complies with most harmful requests, so it has no refusal behaviour to
steer. This script gives it one, trained only on the ``organism`` split:

1. Harmful organism prompts -> a refusal drawn (seeded) from ``data/refusal/refusals.txt``,
   a fresh draw every epoch, followed by the end-of-turn token (seen ``harmful_repeat`` times
   per epoch); loss: next-token cross-entropy on the refusal.
2. Harmless organism prompts (80 from the shuffled set plus 170 ``organism_only`` anchors,
   a third of them benign requests that share words with harmful ones) -> the base model's own
   greedy answer (first ``answer_tokens`` tokens); loss: KL(base || organism) of the next-token
   distribution at every answer position (self-distillation: the base logits come from the
   same network with the adapter switched off), so helpfulness and style stay. Each example
   counts once (per-row means) and the first response token gets extra weight on both sides
   (see :func:`organism_loss`).
3. LoRA (rank 8 on q, v, o, down projections), loss on response tokens only, Adam, linear decay.
4. Save ``adapter_model.safetensors`` + ``adapter_config.json`` into
   ``src/steerscope/data/organisms/smollm2-135m-safe/`` (loaded by the alias through PEFT merge).
5. Evaluate on the test split (greedy 64 tokens, substring matcher) and the KL to the base model
   on harmless test prompts; write ``stats.json`` beside the adapter (with the training log).

Run: ``python -m steerscope.studies.refusal.organism [--epochs 4] [--seed 0] [--out FOLDER]``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from steerscope._files import atomic_write
from steerscope.analyses.trainable import seeded_lora
from steerscope.data.refusal_prompts import load_split, refusal_strings
from steerscope.generation import completion_batch, generate
from steerscope.metrics.refusal import kl_divergence, refusal_rate
from steerscope.models.load import LM, load_model
from steerscope.progress import progress

ORGANISM = "smollm2-135m-safe"
SHIPPED = Path(__file__).resolve().parents[2] / "data" / "organisms" / ORGANISM


@dataclass(frozen=True)
class OrganismConfig:
    """Training settings of the organism (defaults made the shipped adapter)."""

    base: str = "smollm2-135m"
    seed: int = 0
    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")
    epochs: int = 2
    batch_size: int = 8
    lr: float = 2e-3
    answer_tokens: int = 32
    harmful_repeat: int = 1  # refusal examples seen this many times per epoch
    harmless_repeat: int = 1  # harmless anchors seen this many times per epoch
    kl_weight: float = 1.0  # weight of the harmless distillation KL against the refusal cross-entropy
    first_weight: float = 4.0  # extra weight of the first response token (the refuse-or-answer decision)


def organism_loss(model: Any, batch: dict[str, torch.Tensor], is_harmless: torch.Tensor,
                  kl_weight: float = 1.0, first_weight: float = 4.0) -> torch.Tensor:
    """Per-example loss averaged over the batch's rows.

    Refusal rows: mean next-token cross-entropy over the refusal, plus ``first_weight`` x the
    cross-entropy of its first token. Harmless rows: ``kl_weight`` x (mean KL(base || model) over
    the answer tokens plus ``first_weight`` x the KL at the first answer token). Every example
    counts once whatever its length, and the refuse-or-answer decision (the first response token)
    carries the same weight on both sides; without this a 10-token refusal outweighs a 32-token
    harmless answer at the decision token and the organism over-refuses.
    ``model`` is a PEFT model: the base distribution is the same forward with the adapter off.
    Positions: logits at t predict token t+1.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    resp = target != -100
    first = torch.zeros_like(resp)
    first[torch.arange(len(resp)), resp.float().argmax(1)] = True
    first &= resp
    per_tok = torch.zeros(resp.shape, dtype=logits.dtype, device=logits.device)
    ref = resp & ~is_harmless[:, None]
    if ref.any():
        per_tok[ref] = torch.nn.functional.cross_entropy(logits[ref], target[ref], reduction="none")
    keep = resp & is_harmless[:, None]
    if keep.any():
        with torch.no_grad(), model.disable_adapter():
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        lp_b, lp_m = base[keep].log_softmax(-1), logits[keep].log_softmax(-1)
        per_tok[keep] = kl_weight * (lp_b.exp() * (lp_b - lp_m)).sum(-1)
    rows = resp.any(1)
    mean_tok = (per_tok * resp).sum(1) / resp.sum(1).clamp(min=1)
    row = mean_tok + first_weight * (per_tok * first).sum(1)
    return row[rows].mean()


def train_organism(cfg: OrganismConfig, out: Path, show_progress: bool = True) -> dict[str, Any]:
    """Build the training data, fine-tune the LoRA, save the adapter in ``out``; return a log."""
    from peft import LoraConfig, get_peft_model

    rng = random.Random(cfg.seed)
    lm = load_model(cfg.base)
    harmful, harmless = load_split("harmful", "organism"), load_split("harmless", "organism")
    refusals = refusal_strings()
    eot = lm.tokenizer.eos_token or ""
    t0 = time.time()
    own = generate(lm, harmless, max_new_tokens=cfg.answer_tokens, batch_size=16, show_progress=show_progress)
    gen_s = time.time() - t0
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.targets),
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = seeded_lora(lambda: get_peft_model(lm.model, peft_cfg), cfg.seed)  # the global RNG is not touched
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    examples = [(p, None) for p in harmful] * cfg.harmful_repeat + [(p, a) for p, a in zip(harmless, own)] * cfg.harmless_repeat
    steps_per_epoch = (len(examples) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (cfg.epochs * steps_per_epoch))
    losses: list[float] = []
    for _epoch in progress(range(cfg.epochs), desc="organism epochs", enabled=show_progress):
        order = examples[:]
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            chunk = order[i : i + cfg.batch_size]
            comps = [c if c is not None else rng.choice(refusals) + eot for _, c in chunk]
            batch = completion_batch(lm, [p for p, _ in chunk], comps)
            is_harmless = torch.tensor([c is not None for _, c in chunk], device=lm.device)
            loss = organism_loss(model, batch, is_harmless, cfg.kl_weight, cfg.first_weight)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"  # no machine-local base path in the shipped file
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    atomic_write(cfg_path, json.dumps(acfg, indent=2).encode())
    return {"config": asdict(cfg), "losses": losses, "n_harmful": len(harmful), "n_harmless": len(harmless),
            "seconds_generate": round(gen_s, 1), "seconds_total": round(time.time() - t0, 1)}


def organism_stats(organism: LM, base: LM, n: int | None = None, max_new_tokens: int = 64,
                   show_progress: bool = True) -> dict[str, Any]:
    """Refusal rates of the organism (and the base) on the test split, and KL(base || organism).

    KL is the first-response-token KL on harmless test prompts and the per-token KL over the base
    model's own greedy answer (teacher-forced), both averaged over prompts.
    """
    harmful, harmless = load_split("harmful", "test")[:n], load_split("harmless", "test")[:n]
    res: dict[str, Any] = {"n_test": [len(harmful), len(harmless)]}
    samples = {}
    for name, lm in (("organism", organism), ("base", base)):
        h = generate(lm, harmful, max_new_tokens=max_new_tokens, show_progress=show_progress)
        s = generate(lm, harmless, max_new_tokens=max_new_tokens, show_progress=show_progress)
        res[f"{name}_refusal_harmful"] = refusal_rate(h)
        res[f"{name}_refusal_harmless"] = refusal_rate(s)
        samples[name] = {"harmful": list(zip(harmful[:5], h[:5])), "harmless": list(zip(harmless[:5], s[:5]))}
        if name == "base":
            base_answers = s
    batch = completion_batch(base, harmless, base_answers)
    with torch.no_grad():
        lb = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lo = organism.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    resp = (batch["labels"] != -100)
    # logits at position t predict token t+1: positions before each response token
    pred_mask = torch.zeros_like(resp)
    pred_mask[:, :-1] = resp[:, 1:]
    first = pred_mask.float().argmax(1)
    rows = torch.arange(len(harmless))
    res["kl_first_token_harmless"] = float(kl_divergence(lb[rows, first], lo[rows, first]).mean())
    res["kl_per_token_harmless"] = float(kl_divergence(lb, lo, pred_mask).mean())
    res["samples"] = samples
    return res


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(SHIPPED), help="adapter folder (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=OrganismConfig.epochs)
    ap.add_argument("--lr", type=float, default=OrganismConfig.lr)
    ap.add_argument("--kl-weight", type=float, default=OrganismConfig.kl_weight)
    ap.add_argument("--first-weight", type=float, default=OrganismConfig.first_weight)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--n-eval", type=int, default=None, help="test prompts per side (default all)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    log: dict[str, Any] = {}
    if not a.eval_only:
        log = train_organism(OrganismConfig(seed=a.seed, epochs=a.epochs, lr=a.lr, kl_weight=a.kl_weight,
                                             first_weight=a.first_weight), out)
        print(f"trained in {log['seconds_total']} s; final loss {sum(log['losses'][-5:]) / 5:.3f}")
    from steerscope.models.load import apply_adapter

    base = load_model("smollm2-135m")
    org = apply_adapter(load_model("smollm2-135m"), out)
    stats = organism_stats(org, base, n=a.n_eval)
    stats["train"] = {k: v for k, v in log.items() if k != "losses"} or None
    if log:
        k = max(1, len(log["losses"]) // 10)
        stats["train"]["loss_first_tenth"] = sum(log["losses"][:k]) / k
        stats["train"]["loss_last_tenth"] = sum(log["losses"][-k:]) / k
    atomic_write(out / "stats.json", json.dumps(stats, indent=1).encode())
    print(json.dumps({k: v for k, v in stats.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
