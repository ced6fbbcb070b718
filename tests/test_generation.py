"""One of each: the chat batch, completion batch and sequence log-probs of generation.py against
independent computations; seeded sampling without the global RNG; extract with a callable aggregator;
SteeringVector.single_layer."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.errors import DataError, SteerscopeError, VectorError
from steerscope.extract import aggregate
from steerscope.generation import IGNORE, chat_batch, completion_batch, generate, sequence_logprobs

PROMPTS = ["Write a formal letter to the board.", "hey whats up", "Tell me about your weekend, please."]


@pytest.fixture(scope="module")
def lm(smol_tokenizer):
    return make_tiny("llama", seed=7, tokenizer=smol_tokenizer)


def test_chat_batch_is_format_chat_then_left_padded_tokens(lm) -> None:
    enc = chat_batch(lm, PROMPTS, system="Be brief.")
    for row, p in zip(range(len(PROMPTS)), PROMPTS):
        ref = lm.tokenizer(lm.format_chat(p, "Be brief."), add_special_tokens=False)["input_ids"]
        n = int(enc["attention_mask"][row].sum())
        assert enc["input_ids"][row, -n:].tolist() == ref and n == len(ref)
        assert enc["attention_mask"][row, -n:].all() and not enc["attention_mask"][row, :-n].any()  # left padding
    raw = chat_batch(lm, ["plain text"], chat=False)
    assert raw["input_ids"][0].tolist() == lm.tokenizer("plain text")["input_ids"]


def _by_hand(lm, prompt: str, completion: str) -> float:
    """Unpadded, one row: Σ log p(completion token | everything before it)."""
    pid = lm.tokenizer(lm.format_chat(prompt), add_special_tokens=False)["input_ids"]
    cid = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pid + cid])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
    return float(sum(lp[len(pid) + t - 1, c] for t, c in enumerate(cid)))


def test_sequence_logprobs_of_a_padded_batch_equal_one_row_at_a_time(lm) -> None:
    comps = [" Dear board,", " nothing much, you?", " I went hiking in the hills with friends."]
    batch = completion_batch(lm, PROMPTS, comps)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    with torch.no_grad():
        lp = sequence_logprobs(lm, batch)
    ref = torch.tensor([_by_hand(lm, p, c) for p, c in zip(PROMPTS, comps)], dtype=torch.float64)
    assert torch.allclose(lp.double(), ref, atol=1e-3)
    short = completion_batch(lm, PROMPTS[:1], comps[2:], max_tokens=2)
    assert int((short["labels"] != IGNORE).sum()) == 2


def test_sequence_logprobs_carries_gradients_to_a_trainable_input(lm) -> None:
    batch = completion_batch(lm, PROMPTS[:2], [" yes", " no"])
    emb = lm.model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    try:
        sequence_logprobs(lm, batch).sum().backward()
        assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    finally:
        emb.weight.requires_grad_(False)
        emb.weight.grad = None


def test_sampled_generate_leaves_the_global_rng_alone_and_a_seed_reproduces(lm) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=5)
    c = generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=6)
    assert a == b and a != c
    generate(lm, PROMPTS[:1], max_new_tokens=4, do_sample=True)  # seed=None: a fresh seed, still not the global one
    assert torch.equal(torch.get_rng_state(), state)
    greedy = generate(lm, PROMPTS, max_new_tokens=8)
    assert greedy == generate(lm, PROMPTS, max_new_tokens=8)


def test_seeded_sampler_draws_from_the_softmax_at_the_temperature() -> None:
    from steerscope.generation import SeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    sampler = SeededSampler(0.7, seed=0)
    picks = sampler(torch.zeros(1), logits).argmax(-1)
    freq = torch.bincount(picks, minlength=4).double() / len(picks)
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 0.7, -1), atol=0.01)


def test_a_seed_gives_the_tokens_of_global_seeding_with_hf_sampling(lm) -> None:
    """Runs sampled with the old global-RNG code keep their texts (the documented study numbers)."""
    enc = chat_batch(lm, PROMPTS)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(11)
        with torch.no_grad():
            ref = lm.model.generate(**enc, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=10,
                                    pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        torch.set_rng_state(state)
    ref_texts = lm.tokenizer.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generate(lm, PROMPTS, max_new_tokens=10, do_sample=True, temperature=0.8, seed=11) == ref_texts


def test_extract_accepts_a_callable_aggregator(lm) -> None:
    pos, neg = PROMPTS[:2], ["write a chill text", "yo send a casual msg"]
    dim = ss.extract(lm, pos, neg, method="dim", layers=[1, 2])

    def median_diff(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return p.median(0).values - n.median(0).values

    acts = ss.collect(lm, [lm.format_chat(x) for x in pos + neg], [1, 2], positions=[-1])
    vec = ss.extract(lm, pos, neg, method=median_diff, layers=[1, 2])
    for layer in (1, 2):
        assert torch.allclose(vec[layer], median_diff(acts[layer][:2], acts[layer][2:]), atol=1e-5)
    assert vec.provenance.method == "median_diff"
    same = ss.extract(lm, pos, neg, method=aggregate.diff_in_means, layers=[1, 2])
    assert all(torch.allclose(same[k], dim[k]) for k in (1, 2))
    with pytest.raises(DataError, match="shape"):
        ss.extract(lm, pos, neg, method=lambda p, n: p - n, layers=[1])
    with pytest.raises(DataError, match="or pass a function"):
        ss.extract(lm, pos, neg, method="nope", layers=[1])


def test_single_layer_unpacks_and_refuses_other_shapes() -> None:
    v = ss.SteeringVector({3: torch.ones(8)})
    layer, s = v.single_layer(purpose="attribution")
    assert layer == 3 and torch.equal(s, v[3]) and v.single_layer().layer == 3
    with pytest.raises(VectorError, match="attribution takes a one-layer resid_pre vector.*select"):
        ss.SteeringVector({3: torch.ones(8), 4: torch.ones(8)}).single_layer(purpose="attribution")
    mlp = ss.SteeringVector({3: torch.ones(8)}, "mlp_out")
    with pytest.raises(SteerscopeError, match="resid_pre"):
        mlp.single_layer()
    assert mlp.single_layer(site=None).layer == 3


def test_a_bare_string_is_one_prompt_not_one_per_character(lm) -> None:
    text = "Hi there"
    one = generate(lm, text, max_new_tokens=3)
    assert isinstance(one, list) and one == generate(lm, [text], max_new_tokens=3)
    assert chat_batch(lm, text)["input_ids"].shape == chat_batch(lm, [text])["input_ids"].shape
    labels = completion_batch(lm, [text], ["Hello!"])["labels"]
    assert torch.equal(completion_batch(lm, text, "Hello!")["labels"], labels)
    acts = ss.collect(lm, lm.format_chat(text), [1])
    assert acts[1].shape == (1, lm.d_model)
    vec = ss.extract(lm, "Write a formal letter.", "yo whats up", layers=[1])
    ref = ss.extract(lm, ["Write a formal letter."], ["yo whats up"], layers=[1])
    assert vec.provenance.n_examples == 2 and torch.allclose(vec[1], ref[1])


def test_generate_accepts_a_raw_tensor_with_layer_and_a_vector_file(lm, tmp_path) -> None:
    vec = ss.SteeringVector({1: 4.0 * torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))})
    ref = generate(lm, PROMPTS[:2], vector=vec, alpha=2.0, max_new_tokens=4)
    assert ref != generate(lm, PROMPTS[:2], max_new_tokens=4)  # the vector changes the output
    assert generate(lm, PROMPTS[:2], vector=vec[1], layer=1, alpha=2.0, max_new_tokens=4) == ref
    assert generate(lm, PROMPTS[:2], vector=vec.save(tmp_path / "v.safetensors"), alpha=2.0, max_new_tokens=4) == ref
    assert generate(lm, PROMPTS[:2], vector=[vec[1], None], layer=1, alpha=2.0, max_new_tokens=4)[0] == ref[0]
    with pytest.raises(VectorError, match="layer="):
        generate(lm, PROMPTS[:1], vector=vec[1], alpha=2.0, max_new_tokens=4)


def test_generate_top_k_1_sampling_with_a_seed_is_greedy_and_top_p_top_k_change_the_draw(lm) -> None:
    greedy = generate(lm, PROMPTS, max_new_tokens=8)
    assert generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, top_k=1, seed=3) == greedy
    assert generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3) == greedy
    plain = generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    nucleus = generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.5, top_k=5, seed=3)
    assert nucleus == generate(lm, PROMPTS, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.5, top_k=5,
                               seed=3)
    assert nucleus != plain


@pytest.mark.parametrize("kw, match", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                       ({"top_p": float("nan")}, "top_p"), ({"top_k": -1}, "top_k"),
                                       ({"top_k": 2.5}, "top_k"), ({"temperature": 0.0}, "temperature")])
def test_generate_refuses_sampling_options_out_of_range(lm, kw, match) -> None:
    with pytest.raises(SteerscopeError, match=match):
        generate(lm, PROMPTS[:1], max_new_tokens=2, do_sample=True, **kw)


def test_the_vllm_backend_passes_top_p_and_top_k_through_to_sampling_params(lm, monkeypatch) -> None:
    """The translation without vLLM: VLLMEngine -> stop_params -> the engine process's SamplingParams."""
    import importlib.util
    from pathlib import Path

    from steerscope.backends import vllm as bv
    from steerscope.backends.base import Request

    sent: dict = {}

    class FakeEngine:
        def generate_ids(self, ids, specs, params):
            sent.update(params)
            return [[] for _ in ids], 0.0

    monkeypatch.setattr(bv, "engine_for", lambda lm, *args, **kwargs: FakeEngine())
    bv.VLLMEngine().generate(lm, [Request("Hi", do_sample=True, temperature=0.7, top_p=0.9, top_k=40, seed=1,
                                          max_new_tokens=3)])
    assert sent["top_p"] == 0.9 and sent["top_k"] == 40 and sent["temperature"] == 0.7
    sent.clear()
    bv.VLLMEngine().generate(lm, [Request("Hi", top_p=0.9, top_k=40, max_new_tokens=3)])  # greedy: not sent
    assert "top_p" not in sent and "top_k" not in sent and sent["temperature"] == 0.0

    path = Path(bv.ENGINE_DIR) / "steerscope_vllm_engine.py"
    spec = importlib.util.spec_from_file_location("steerscope_vllm_engine_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = []

    class LLM:
        def generate(self, prompts, sps, use_tqdm=False):
            class Out:
                outputs = [type("C", (), {"token_ids": [1]})()]
            return [Out() for _ in prompts]

    req = {"prompts": [{"ids": [1, 2], "steer": None}],
           "params": {"max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1}}
    mod._generate(LLM(), req, set(), lambda s, k: None, lambda **kw: made.append(kw) or kw, lambda **kw: kw)
    assert made[0]["top_p"] == 0.9 and made[0]["top_k"] == 40
