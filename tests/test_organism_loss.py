"""The organism's training loss: refusal cross-entropy plus harmless self-distillation KL."""

from __future__ import annotations

import torch

from conftest import batch_ids, make_tiny
from steerscope.studies.refusal.organism import organism_loss


def _peft(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    lm = make_tiny("llama", seed=seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none")
    return lm, get_peft_model(lm.model, cfg).eval()


def _batch():
    b = batch_ids(n=4, length=9, seed=3)
    labels = b["input_ids"].clone()
    labels[:, :5] = -100  # prompt
    return {**b, "labels": labels}


def _manual(base_logits, logits, tgt, harmless, kl_weight, first_weight):
    """Per-row loss by loops: mean over response tokens + first_weight x the first one; row mean."""
    rows = []
    for r in range(len(tgt)):
        idx = [t for t in range(tgt.shape[1]) if tgt[r, t] != -100]
        vals = []
        for t in idx:
            if harmless[r]:
                pb, pm = base_logits[r, t].log_softmax(-1), logits[r, t].log_softmax(-1)
                vals.append(kl_weight * (pb.exp() * (pb - pm)).sum())
            else:
                vals.append(torch.nn.functional.cross_entropy(logits[r, t][None], tgt[r, t][None]))
        rows.append(sum(vals) / len(vals) + first_weight * vals[0])
    return sum(rows) / len(rows)


def test_loss_equals_a_loop_computation_and_kl_vanishes_at_init():
    lm, model = _peft()
    batch = _batch()
    harmless = torch.tensor([True, False, True, False])
    with torch.no_grad():
        at_init = organism_loss(model, batch, harmless, kl_weight=1.0, first_weight=3.0)
        base = lm.model(input_ids=batch["input_ids"]).logits[:, :-1].float()  # LoRA B = 0: the base model
    tgt = batch["labels"][:, 1:]
    expect = _manual(base, base, tgt, harmless, 1.0, 3.0)
    assert torch.allclose(at_init, expect, atol=1e-5)
    ce_rows = _manual(base[~harmless], base[~harmless], tgt[~harmless], torch.zeros(2, dtype=torch.bool), 1.0, 3.0)
    assert torch.allclose(at_init, ce_rows / 2, atol=1e-5)  # KL(base || base) = 0: only the 2 refusal rows count
    with torch.no_grad():  # move the adapter: KL > 0 and the loss equals the loop formula
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        mixed = organism_loss(model, batch, harmless, kl_weight=2.0, first_weight=3.0)
        steered = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    assert torch.allclose(mixed, _manual(base, steered, tgt, harmless, 2.0, 3.0), atol=1e-4)
    kl_only = _manual(base[harmless], steered[harmless], tgt[harmless], torch.ones(2, dtype=torch.bool), 2.0, 3.0)
    assert kl_only > 1e-3


def test_loss_trains_only_the_adapter():
    _, model = _peft(seed=1)
    model.train()
    loss = organism_loss(model, _batch(), torch.tensor([True, False, True, False]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
