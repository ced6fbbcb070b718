"""RLOO trainer and trainable steering bias, checked against independent computations."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from steerscope.analyses.trainable import LoRAPolicy, SteeringBias
from steerscope.extract.rl import (
    RLOOConfig,
    completion_mask,
    policy_logprobs,
    rloo_advantages,
    sample,
    surrogate_backward,
    train_rloo,
)
from steerscope.hooks import hook_count

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hi"]


def test_rloo_advantages_leave_one_out():
    r = torch.tensor([[1.0, -1.0, -1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = rloo_advantages(r)
    manual = torch.stack([torch.stack([r[g, i] - torch.cat([r[g, :i], r[g, i + 1:]]).mean() for i in range(4)])
                          for g in range(2)])
    assert torch.allclose(a, manual)
    assert torch.all(a[1] == 0)
    with pytest.raises(ss.SteerscopeError):
        rloo_advantages(torch.ones(3, 1))


def test_completion_mask_counts_up_to_first_eos():
    gen = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])
    m = completion_mask(gen, [2])
    assert m.tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]


def _bias(lm, layers=(1, 3), gate=False, scale=0.5, seed=0):
    bias = SteeringBias(lm, list(layers), gate=gate)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bias.s.values():
            p.copy_(scale * torch.randn(p.shape, generator=g))
        if gate:
            for p in bias.w.values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return bias


def test_bias_vector_equals_ordinary_steering_and_hooks_are_removed(tiny_llama):
    lm = tiny_llama
    bias = _bias(lm)
    batch = lm.tokenize([lm.format_chat(p) for p in PROMPTS])
    n0 = hook_count(lm.model)
    with torch.no_grad():
        base = lm.model(**batch).logits
        with bias.active():
            assert hook_count(lm.model) > n0
            a = lm.model(**batch).logits
        with ss.steering(lm, bias.vector(), alpha=1.0):
            b = lm.model(**batch).logits
    assert hook_count(lm.model) == n0
    assert not torch.allclose(a, base)
    assert torch.allclose(a, b, atol=1e-5)
    v = bias.vector()
    assert v.site == "mlp_out" and v.layers == [1, 3] and bias.n_trainable == 2 * lm.d_model


def test_zero_gate_params_equal_plain_bias_and_gate_gets_gradient(tiny_llama):
    lm = tiny_llama
    plain, gated = _bias(lm), _bias(lm, gate=True)
    with torch.no_grad():
        for p in gated.w.values():
            p.zero_()
    batch = lm.tokenize([lm.format_chat(p) for p in PROMPTS])
    with torch.no_grad(), plain.active():
        a = lm.model(**batch).logits
    with gated.active():
        out = lm.model(**batch).logits
        out[..., :50].sum().backward()
    assert torch.allclose(a, out.detach(), atol=1e-5)
    assert gated.w["1"].grad is not None and gated.w["1"].grad.abs().sum() > 0
    assert gated.n_trainable == 2 * (2 * lm.d_model + 1)


def test_teacher_forced_logprobs_match_generation_scores_under_the_bias(tiny_llama):
    """log π recomputed in one padded teacher-forced pass = the scores seen while decoding with a KV cache."""
    lm = tiny_llama
    bias = _bias(lm, gate=True)
    enc = lm.tokenize([lm.format_chat(p) for p in PROMPTS])
    with torch.no_grad(), bias.active():
        out = lm.model.generate(**enc, do_sample=False, max_new_tokens=6, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=lm.tokenizer.pad_token_id,
                                eos_token_id=None)
        P = enc["input_ids"].shape[1]
        gen = out.sequences[:, P:]
        ref = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, gen[:, t:t + 1])[:, 0]
                           for t, s in enumerate(out.scores)], 1).sum(1)
        lp = policy_logprobs(lm, enc["input_ids"], enc["attention_mask"], gen, torch.ones_like(gen, dtype=torch.bool))
    assert torch.allclose(lp, ref, atol=1e-3)


def _independent_loss(lm, pid, pmask, gen, gmask, adv):
    """The same surrogate loss, one unpadded row at a time, written without the trainer's code."""
    total = 0.0
    n = gmask.sum()
    for i in range(pid.shape[0]):
        p = pid[i][pmask[i].bool()]
        g = gen[i][gmask[i]]
        ids = torch.cat([p, g])[None]
        logits = lm.model(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits, -1)
        lp = sum(logp[len(p) - 1 + t, g[t]] for t in range(len(g)))
        total = total - adv[i] * lp
    return total / n


def test_policy_gradient_matches_finite_differences(smol_tokenizer):
    from conftest import make_tiny

    lm = make_tiny("llama", seed=3, tokenizer=smol_tokenizer)
    lm.model.double()
    bias = _bias(lm, layers=(2,), scale=0.3)
    with torch.no_grad():
        bias.s["2"].data = bias.s["2"].data.double()
    pid, pmask, gen, gmask, _ = sample(lm, bias, [PROMPTS[2], lm.format_chat(PROMPTS[0])], k=2,
                                       max_new_tokens=4, temperature=1.0, seed=1)
    adv = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    bias.zero_grad()
    surrogate_backward(lm, bias, pid, pmask, gen, gmask, adv, micro_batch=4)
    grad = bias.s["2"].grad.clone()
    s = bias.s["2"]
    eps = 1e-3  # Llama's RMSNorm computes in float32 even in a float64 model, so not smaller
    for j in [0, 31]:
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                s[j] += sign * eps
                with bias.active():
                    vals.append(float(_independent_loss(lm, pid, pmask, gen, gmask, adv)))
                s[j] -= sign * eps
        fd = (vals[0] - vals[1]) / (2 * eps)
        assert abs(fd - float(grad[j])) < 1e-6 + 2e-3 * abs(fd), (j, fd, float(grad[j]))
    assert grad.abs().max() > 1e-6


@pytest.mark.parametrize("policy", ["bias", "gated", "lora"])
def test_shared_prompt_pass_gives_the_per_row_gradient(smol_tokenizer, policy):
    """A prompt run once with its KV cache repeated for its k rows: the same loss and gradient as laying
    every row out in full (float64 tiny model), with rows skipped (A = 0) and a micro-batch smaller than k."""
    from conftest import make_tiny

    lm = make_tiny("llama", seed=5, tokenizer=smol_tokenizer)
    lm.model.double()
    pol = LoRAPolicy(lm, r=2, seed=1) if policy == "lora" else _bias(lm, layers=(1, 2), gate=policy == "gated")
    for p in pol.parameters():
        p.data = p.data.double()
        if policy == "lora":
            p.data += 0.05 * torch.randn_like(p)
    texts = [lm.format_chat(PROMPTS[0]), PROMPTS[2] + " and a much longer prompt than the other"]
    pid, pmask, gen, gmask, _ = sample(lm, pol, texts, k=3, max_new_tokens=5, temperature=1.0, seed=2)
    adv = torch.tensor([1.0, 0.0, -0.5, 0.25, -1.0, 0.75], dtype=torch.float64)
    grads, losses = [], []
    for group, mb in ((1, 16), (3, 2)):
        for p in pol.parameters():
            p.grad = None
        losses.append(surrogate_backward(lm, pol, pid, pmask, gen, gmask, adv, micro_batch=mb, group=group))
        grads.append(torch.cat([p.grad.flatten() for p in pol.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-9, abs=1e-12)
    err = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert err < 1e-6 and grads[0].abs().max() > 1e-6, err
    with pytest.raises(ValueError, match="groups of 4"):
        surrogate_backward(lm, pol, pid, pmask, gen, gmask, adv, group=4)


@pytest.mark.parametrize("family", ["gemma3_text", "gpt2", "gpt_neox"])
def test_shared_prompt_pass_on_other_cache_and_position_kinds(smol_tokenizer, family):
    """Sliding-window layers (Gemma 3), learned absolute positions (GPT-2), rotary on part of the head
    (GPT-NeoX): the shared pass's gradient equals the per-row one there too."""
    from conftest import make_tiny

    lm = make_tiny(family, seed=1, tokenizer=smol_tokenizer)
    lm.model.double()
    pol = _bias(lm, layers=(1,), scale=0.3)
    for p in pol.parameters():
        p.data = p.data.double()
    batch = sample(lm, pol, ["Hello there, how are", "Hi"], k=3, max_new_tokens=5, temperature=1.0, seed=1)[:4]
    adv = torch.linspace(-1, 1, 6, dtype=torch.float64) + 0.05
    grads = []
    for group in (1, 3):
        for p in pol.parameters():
            p.grad = None
        surrogate_backward(lm, pol, *batch, adv, group=group)
        grads.append(torch.cat([p.grad.flatten() for p in pol.parameters()]))
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sampling_from_a_shared_prefill_draws_the_same_tokens(smol_tokenizer, monkeypatch, family):
    """Each prompt prefilled once, its cache repeated for its k rows: the same tokens, seed for seed, as
    prefilling every row (prompts of different lengths, so rows are left-padded; a gated bias)."""
    import importlib

    from conftest import make_tiny

    rl = importlib.import_module("steerscope.extract.rl")

    lm = make_tiny(family, seed=2, tokenizer=smol_tokenizer)
    lm.model.double()
    pol = _bias(lm, layers=(0, 2), gate=True)
    for p in pol.parameters():
        p.data = p.data.double()
    texts = [lm.format_chat(PROMPTS[0]), "Hi", lm.format_chat(PROMPTS[1] + " in one word, please")]
    calls = []
    real = rl._prefilled
    monkeypatch.setattr(rl, "_prefilled", lambda *a: calls.append(1) or real(*a))
    shared = sample(lm, pol, texts, k=3, max_new_tokens=6, temperature=1.0, seed=4)
    monkeypatch.setattr(rl, "_prefilled", lambda *a: {})
    full = sample(lm, pol, texts, k=3, max_new_tokens=6, temperature=1.0, seed=4)
    assert calls and all(torch.equal(a, b) for a, b in zip(shared[:4], full[:4])) and shared[4] == full[4]
    assert len(set(shared[4])) > 2  # the samples differ from each other: the draws were not all one token


def _reward(prompt, completion, answer):
    return float(len(completion) % 3 == 0) * 2 - 1


def test_training_resumes_after_a_crash_to_the_same_result(tiny_llama, tmp_path):
    lm = tiny_llama
    cfg = RLOOConfig(steps=3, prompts_per_step=2, k=3, lr=1e-2, warmup_frac=0.0, max_new_tokens=4,
                     checkpoint_every=1, seed=0)
    answers = ["5", "red", "hi"]
    full = SteeringBias(lm, [3])
    flags = [p.requires_grad for p in lm.model.parameters()]
    res = train_rloo(lm, full, PROMPTS, answers, _reward, cfg, checkpoint_dir=tmp_path / "a", show_progress=False)
    assert len(res.history) == 3 and res.n_trainable == lm.d_model
    assert [p.requires_grad for p in lm.model.parameters()] == flags  # the user's model is left as it was

    class Crash(RuntimeError):
        pass

    def crash(log):
        if log.step == 2:
            raise Crash()

    part = SteeringBias(lm, [3])
    with pytest.raises(Crash):
        train_rloo(lm, part, PROMPTS, answers, _reward, cfg, checkpoint_dir=tmp_path / "b", show_progress=False,
                   on_step=crash)
    again = SteeringBias(lm, [3])
    res2 = train_rloo(lm, again, PROMPTS, answers, _reward, cfg, checkpoint_dir=tmp_path / "b", show_progress=False)
    assert res2.resumed_from == 2 and len(res2.history) == 3
    assert torch.allclose(again.s["3"], full.s["3"], atol=1e-6)
    assert (tmp_path / "b" / "policy.safetensors").is_file() and (tmp_path / "b" / "state.json").is_file()
    assert full.s["3"].abs().sum() > 0


def test_a_checkpoint_replaces_symlinks_in_its_folder_and_never_writes_through_them(tiny_llama, tmp_path):
    """Every checkpoint file (and any temp name a writer might use) that is a symlink to a file elsewhere is
    replaced, never followed; the files get the umask's mode; the checkpoint still loads."""
    import os
    import stat

    from steerscope.extract.result import StepLog
    from steerscope.extract.rl import load_checkpoint, save_checkpoint

    lm, folder = tiny_llama, tmp_path / "ckpt"
    folder.mkdir()
    names = ["policy.safetensors", "optim.safetensors", "state.json",
             "policy.safetensors.tmp", "optim.safetensors.tmp", "state.json.tmp"]
    victims = {}
    for name in names:
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("precious\n")
        (folder / name).symlink_to(victims[name])
    bias = _bias(lm, layers=(1,), gate=True)
    opt = torch.optim.Adam(bias.parameters(), lr=0.1)
    sum(p.sum() for p in bias.parameters()).backward()
    opt.step()
    history = [StepLog(0, 1.0, 0.5, 0.1, 0.2, 4.0, 3, 0.01)]
    old = os.umask(0o022)
    try:
        save_checkpoint(folder, bias, opt, 1, history, RLOOConfig(steps=2))
    finally:
        os.umask(old)
    assert all(v.read_text() == "precious\n" for v in victims.values())
    for name in names[:3]:
        assert (folder / name).is_file() and not (folder / name).is_symlink()
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644
    assert not list(folder.glob(".*.tmp"))
    again = _bias(lm, layers=(1,), gate=True, seed=1)
    opt2 = torch.optim.Adam(again.parameters(), lr=0.1)
    step, hist = load_checkpoint(folder, again, opt2)
    assert step == 1 and len(hist) == 1
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), bias.parameters()))


def test_lora_policy_is_off_outside_its_context(smol_tokenizer):
    from conftest import make_tiny

    lm = make_tiny("llama", seed=1, tokenizer=smol_tokenizer)
    batch = lm.tokenize([lm.format_chat(p) for p in PROMPTS])
    with torch.no_grad():
        base = lm.model(**batch).logits
    pol = LoRAPolicy(lm, r=2)
    with torch.no_grad():
        for n, p in pol.params.items():
            if "lora_B" in n:
                p.add_(0.1)
    with torch.no_grad():
        with pol.active():
            on = lm.model(**batch).logits
        off = lm.model(**batch).logits
    assert torch.allclose(off, base, atol=1e-6) and not torch.allclose(on, base, atol=1e-4)
    assert pol.n_trainable > 0


def test_sampling_is_seeded_locally_and_is_hf_sampling_after_global_seeding(tiny_llama):
    lm, bias = tiny_llama, _bias(tiny_llama, gate=True)
    texts = [lm.format_chat(p) for p in PROMPTS]
    state = torch.get_rng_state()
    a = sample(lm, bias, texts, k=3, max_new_tokens=5, temperature=1.3, seed=7)
    b = sample(lm, bias, texts, k=3, max_new_tokens=5, temperature=1.3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[2], b[2]) and a[4] == b[4]
    assert not torch.equal(a[2], sample(lm, bias, texts, k=3, max_new_tokens=5, temperature=1.3, seed=8)[2])
    enc = lm.tokenize([t for t in texts for _ in range(3)], padding_side="left")
    try:  # the independent computation: the global RNG seeded, then HF's own sampling
        torch.manual_seed(7)
        with bias.active(), torch.no_grad():
            ref = lm.model.generate(**enc, do_sample=True, temperature=1.3, top_k=0, top_p=1.0, max_new_tokens=5,
                                    pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        torch.set_rng_state(state)
    assert torch.equal(a[2], ref[:, enc["input_ids"].shape[1]:])


def test_training_twice_with_a_seed_gives_the_same_bias_and_leaves_the_global_rng_alone(tiny_llama):
    lm = tiny_llama
    cfg = RLOOConfig(steps=2, prompts_per_step=2, k=3, lr=1e-2, warmup_frac=0.0, max_new_tokens=4, seed=3)
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        bias = SteeringBias(lm, [2], gate=True)
        res = train_rloo(lm, bias, PROMPTS, ["5", "red", "hi"], _reward, cfg, show_progress=False)
        runs.append((bias, [(h.reward, h.loss) for h in res.history]))
    assert torch.equal(torch.get_rng_state(), state)
    (a, ha), (b, hb) = runs
    assert ha == hb and torch.equal(a.s["2"], b.s["2"]) and torch.equal(a.w["2"], b.w["2"])


def _peft_reference(make, seed):
    """PEFT's own initialisation after seeding the global RNG (what the package did before), RNG restored."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        return make()
    finally:
        torch.set_rng_state(state)


def _lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_policy_init_is_seeded_locally_and_is_peft_init_after_global_seeding(smol_tokenizer):
    from peft import LoraConfig, inject_adapter_in_model

    from conftest import make_tiny

    state = torch.get_rng_state()
    a = _lora_weights(LoRAPolicy(make_tiny("llama", seed=1, tokenizer=smol_tokenizer), r=2, seed=4).lm[0].model)
    b = _lora_weights(LoRAPolicy(make_tiny("llama", seed=1, tokenizer=smol_tokenizer), r=2, seed=4).lm[0].model)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = make_tiny("llama", seed=1, tokenizer=smol_tokenizer).model
    ref = _lora_weights(_peft_reference(lambda: inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=16.0, target_modules=targets, lora_dropout=0.0), model), 4))
    assert ref.keys() == a.keys() and all(torch.equal(ref[k], a[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_A" in k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_lora_is_the_organism_init_of_global_seeding(smol_tokenizer, dtype):
    """The organism's get_peft_model path (shipped adapter): same LoRA weights as torch.manual_seed(seed) + PEFT."""
    from peft import LoraConfig, get_peft_model

    from conftest import make_tiny
    from steerscope.analyses.trainable import seeded_lora

    def cfg():
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    m1, m2 = (make_tiny("llama", tokenizer=smol_tokenizer).model.to(dtype) for _ in range(2))
    ref = _lora_weights(_peft_reference(lambda: get_peft_model(m1, cfg()), 0))
    state = torch.get_rng_state()
    got = _lora_weights(seeded_lora(lambda: get_peft_model(m2, cfg()), 0))
    assert torch.equal(torch.get_rng_state(), state)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
