"""NTP / PO trainers: gradients against finite differences, training lowers the loss, hooks cleaned up."""

from __future__ import annotations

import copy

import pytest
import torch

import steerscope as ss
from steerscope.extract.trained import _loss, po_loss, train_ntp, train_po
from steerscope.hooks import hook_count

PROMPTS = ["How do I bake bread?", "Write a poem about rain."]
COMPS = ["I'm sorry, I can't help.", "Rain falls softly on the roof"]
LOSERS = ["Mix flour and water.", "No."]


@pytest.fixture(scope="module")
def tiny64(tiny_llama):
    m = copy.deepcopy(tiny_llama.model).double()
    return ss.from_hf(m, tiny_llama.tokenizer, name="tiny64")


def _fd_check(lm, kind, rows, alpha=1.5, phi=0.5):
    torch.manual_seed(0)
    v = torch.randn(lm.d_model, dtype=torch.float64) * 0.5
    for p in lm.model.parameters():
        p.requires_grad_(False)
    vp = torch.nn.Parameter(v.clone())
    loss = _loss(lm, kind, 1, vp, rows, alpha, 16, phi)
    loss.backward()
    grad = vp.grad.clone()
    eps = 1e-3  # RMSNorm computes in float32 even in a float64 model, so eps cannot be tiny
    dirs = torch.randn(6, lm.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    fd = torch.zeros(len(dirs), dtype=torch.float64)
    with torch.no_grad():  # central differences along random directions vs the directional derivative
        for i, e in enumerate(dirs):
            fd[i] = (_loss(lm, kind, 1, v + eps * e, rows, alpha, 16, phi)
                     - _loss(lm, kind, 1, v - eps * e, rows, alpha, 16, phi)) / (2 * eps)
    grad = dirs @ grad
    for p in lm.model.parameters():
        p.requires_grad_(True)
    return grad, fd


def test_ntp_gradient_matches_central_finite_differences(tiny64):
    rows = [(p, c, s) for p, c, s in zip(PROMPTS, COMPS, [1.0, -1.0])]
    grad, fd = _fd_check(tiny64, "ntp", rows)
    assert grad.norm() > 0
    assert float((grad - fd).norm() / grad.norm()) < 1e-3


def test_po_gradient_matches_central_finite_differences(tiny64):
    rows = [(p, w, l, s) for p, w, l, s in zip(PROMPTS, COMPS, LOSERS, [1.0, -1.0])]
    grad, fd = _fd_check(tiny64, "po", rows)
    assert grad.norm() > 0
    assert float((grad - fd).norm() / grad.norm()) < 1e-3


def test_po_loss_beta_is_at_least_one_and_reacts_to_reference():
    z = torch.zeros(1)
    n = torch.ones(1)
    base = po_loss(torch.tensor([-1.0]), n, torch.tensor([-2.0]), n, z, z, phi=0.02)
    # delta = 1 * (-1) - (-2) = 1  ->  -log sigmoid(1)
    assert float(base) == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.0)).item())
    big = po_loss(torch.tensor([-1.0]), n, torch.tensor([-2.0]), n, torch.tensor([-500.0]), z, phi=0.02)
    # beta = max(0.02 * 500, 1) = 10 -> delta = -10 + 2 = -8
    assert float(big) == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(-8.0)).item())


def test_ntp_training_lowers_loss_and_leaves_no_hooks(tiny_llama):
    before = hook_count(tiny_llama.model)
    res = train_ntp(tiny_llama, PROMPTS, COMPS, [1.0, 1.0], layer=2, val=(PROMPTS, COMPS, [1.0, 1.0]),
                    epochs=4, lr=0.2, batch_size=2, seed=0, max_tokens=8)
    assert hook_count(tiny_llama.model) == before
    assert res.val_loss[-1] < res.val_loss[0]
    assert res.vector.layers == [2] and res.vector.provenance.method == "ntp"
    assert all(p.requires_grad for p in tiny_llama.model.parameters())


def test_po_training_runs_and_selects_by_validation(tiny_llama):
    res = train_po(tiny_llama, PROMPTS, COMPS, LOSERS, [1.0, 1.0], layer=1,
                   val=(PROMPTS, COMPS, LOSERS, [1.0, 1.0]), epochs=3, lr=0.2, batch_size=2, seed=0, max_tokens=8)
    assert len(res.val_loss) == 3
    assert res.best_epoch == min(range(3), key=lambda i: res.val_loss[i])


def test_one_train_result_record_for_every_trainer():
    import dataclasses

    from steerscope.extract import result, rl, trained

    assert rl.TrainResult is trained.TrainResult is result.TrainResult and rl.StepLog is result.StepLog
    r = result.TrainResult()
    assert (r.vector, r.train_loss, r.val_loss, r.best_epoch, r.history, r.n_trainable, r.seconds,
            r.resumed_from) == (None, [], [], -1, [], 0, 0.0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.best_epoch = 3  # type: ignore[misc]


def test_one_trainable_steering_equals_the_bias_and_per_row_steering(tiny_llama):
    from steerscope.analyses.trainable import SteeringBias, trainable_steering
    from steerscope.extract import trained

    lm = tiny_llama
    assert trained.trainable_steering is trainable_steering
    bias = SteeringBias(lm, [2])
    with torch.no_grad():
        bias.s["2"].copy_(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)))
    batch = lm.tokenize([lm.format_chat(p) for p in PROMPTS])
    with torch.no_grad():
        with bias.active():
            a = lm.model(**batch).logits
        with trainable_steering(lm, 2, bias.s["2"], 1.0, site="mlp_out"):
            b = lm.model(**batch).logits
        with trainable_steering(lm, 1, bias.s["2"], torch.tensor([2.0, -1.0])):
            c = lm.model(**batch).logits
        with ss.steering(lm, [ss.SteeringVector({1: bias.s["2"].detach()})] * 2, alpha=[2.0, -1.0]):
            d = lm.model(**batch).logits
    assert torch.equal(a, b) and torch.allclose(c, d, atol=1e-5)


def test_a_seed_trains_the_same_vector_twice_without_the_global_rng(tiny_llama):
    state = torch.get_rng_state()
    a, b = (train_ntp(tiny_llama, PROMPTS, COMPS, [1.0, -1.0], layer=2, epochs=2, batch_size=1, seed=5)
            for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.vector[2], b.vector[2]) and a.train_loss == b.train_loss and a.best_epoch == b.best_epoch
