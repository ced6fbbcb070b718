"""The reasoning study's evaluation generations on vLLM: greedy equal to HF's, on SmolLM2-135M.

4 test problems x 16 new tokens (the study's ``max_new_tokens``), unsteered and with an ``mlp_out``
vector (the kind the study trains; the backend steers it at resid_pre one layer up, or at the final
norm's input for the last layer). The HF reference is the study's own HF path (``lm.model.generate`` under
``ss.steering`` at ``mlp_out``). Also, sampled with a seed: reproducible, one random stream per
row. Skipped when the engine environment (``steerscope vllm-setup``) is absent, like
test_vllm_parity.py; the engine start takes 1-4 min.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import steerscope as ss
from steerscope.backends import vllm as bv
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import preset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bv.engine_python(required=False) is None,
                                                   reason="no vLLM engine environment (steerscope vllm-setup)")]

NORM = 200.0  # changes all 4 greedy completions (20 changes none, 100 two)


@pytest.fixture(scope="module")
def setup(smol):
    cfg = preset("cpu", n_test=4, backend="vllm")
    _, test = st.problems(cfg)
    yield smol, cfg, test
    bv.close_engines()


@pytest.mark.parametrize("below", [2, 1])
def test_reasoning_greedy_evaluation_on_vllm_equals_hf(setup, below):
    """At the penultimate layer (steered at resid_pre of the last) and the last one (at the final norm's input)."""
    lm, cfg, test = setup
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    vec = ss.SteeringVector({lm.n_layers - below: NORM * r / r.norm()}, "mlp_out")
    assert st.on_vllm(lm, vec, "vllm")
    hf = {n: st.evaluate(lm, test, replace(cfg, backend="hf"), n, s, samples=0) for n, s in (("base", None), ("v", vec))}
    assert hf["v"].examples != hf["base"].examples, "the vector must change the text, or parity proves nothing"
    for name, steer in (("base", None), ("v", vec)):
        vl = st.evaluate(lm, test, cfg, name, steer, samples=0)
        print(f"vllm study parity {name}: {vl.examples}")
        assert vl == hf[name], name
    assert bv.engine_for(lm).stats()["steered_layer_calls"] > 0


def test_sampled_rows_get_their_own_stream_and_reproduce(setup):
    lm = setup[0]
    texts = [lm.format_chat("Write a short poem about the sea.")] * 4
    a = bv.generate(lm, texts, None, 1.0, 16, "all", True, 1.0, 5, True)
    b = bv.generate(lm, texts, None, 1.0, 16, "all", True, 1.0, 5, True)
    assert a == b and len(set(a)) > 1, a
