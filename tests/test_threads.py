"""Interventions are per thread: concurrent steered, unsteered and differently-steered calls on one
model each get their own result (issue 15, item 1)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import steerscope as ss
from steerscope.hooks import hook_count
from test_refusal_mechanisms_fixtures import PROMPTS, smol_tokenizer, tiny_lm  # noqa: F401

N_NEW = 6


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=2, layers=3)


@pytest.fixture(scope="module")
def vecs(lm):
    g = torch.Generator().manual_seed(7)
    return {"v": ss.SteeringVector({1: 6.0 * torch.randn(lm.d_model, generator=g)}),
            "w": ss.SteeringVector({1: 6.0 * torch.randn(lm.d_model, generator=g)})}


def _gen(lm, vec=None):
    return ss.generate(lm, PROMPTS[:2], vector=vec, alpha=1.0, max_new_tokens=N_NEW)


@pytest.fixture(scope="module")
def solo(lm, vecs):
    out = {"none": _gen(lm), "v": _gen(lm, vecs["v"]), "w": _gen(lm, vecs["w"]),
           "v+w": _gen(lm, ss.SteeringVector({1: vecs["v"][1] + vecs["w"][1]}))}
    assert len({tuple(t) for t in out.values()}) == 4  # the fixture's vectors change the text
    return out


def _run(fns):
    with ThreadPoolExecutor(len(fns)) as ex:
        return [f.result(timeout=300) for f in [ex.submit(fn) for fn in fns]]


def test_an_unsteered_call_beside_an_open_steering_context_is_unsteered(lm, vecs, solo):
    entered, done = threading.Event(), threading.Event()

    def steered_holder():
        with ss.steering(lm, vecs["v"], 1.0):
            entered.set()
            assert done.wait(300)  # keep the context open while the other thread generates
            return _gen(lm)  # inside its own context: steered

    def plain():
        assert entered.wait(300)
        try:
            return _gen(lm)
        finally:
            done.set()

    held, free = _run([steered_holder, plain])
    assert free == solo["none"]
    assert held == solo["v"]
    assert hook_count(lm.model) == 0


def test_two_threads_steered_differently_each_get_their_own_vector(lm, vecs, solo):
    both = threading.Barrier(2, timeout=300)

    def worker(name):
        def run():
            with ss.steering(lm, vecs[name], 1.0):
                both.wait()  # both contexts are open now
                out = _gen(lm)
                both.wait()  # neither closes before the other generated
                return out
        return run

    got_v, got_w = _run([worker("v"), worker("w")])
    assert got_v == solo["v"] and got_w == solo["w"]  # not the v+w text


def test_concurrent_generate_calls_steered_unsteered_and_differently(lm, vecs, solo):
    start = threading.Barrier(3, timeout=300)

    def worker(name):
        def run():
            start.wait()
            return [_gen(lm, vecs.get(name)) for _ in range(3)]
        return run

    outs = _run([worker("v"), worker("none"), worker("w")])
    for name, got in zip(("v", "none", "w"), outs):
        assert got == [solo[name]] * 3, name
    assert hook_count(lm.model) == 0


def test_a_pattern_recording_in_one_thread_neither_sees_nor_changes_anothers_forward(lm):
    batch = lm.tokenize([lm.format_chat(p) for p in PROMPTS[:2]])
    with torch.no_grad():
        ref = lm.model(**batch).logits
    impl = lm.model.config._attn_implementation
    entered, done = threading.Event(), threading.Event()

    def recorder():
        with ss.recording(lm, ["blocks.1.attn.pattern"]) as cache, torch.no_grad():
            lm.model(**batch)
            entered.set()
            assert done.wait(300)
            return len(cache.calls("blocks.1.attn.pattern"))

    def other():
        assert entered.wait(300)
        try:
            with torch.no_grad():
                return [lm.model(**batch).logits for _ in range(2)]
        finally:
            done.set()

    n_calls, logits = _run([recorder, other])
    assert n_calls == 1  # the other thread's two forwards were not recorded
    for x in logits:
        assert torch.equal(x, ref)  # and ran exactly as without steerscope
    assert lm.model.config._attn_implementation == impl and hook_count(lm.model) == 0
