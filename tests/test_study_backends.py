"""``--backend vllm`` in the reasoning and identifiability studies, without an engine.

The option is accepted on the command line, forwarded to the vLLM entry point
(``steerscope.backends.vllm.generate``, recorded here) where the engine can apply the steering and
left on HF where it cannot (context factories such as a gated bias, ``mlp_out`` of the last layer),
and it is not part of a run's identity, so a run resumes across backends. The backend's own pieces:
``mlp_out`` l steers like ``resid_pre`` l + 1 (checked on HF, several families), and per-row
vectors, alphas and seeds reach the engine request.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.analyses.trainable import SteeringBias
from steerscope.backends import vllm as bv
from steerscope.errors import StudyError
from steerscope.runs import Run
from steerscope.studies.identifiability import steps as ist
from steerscope.studies.identifiability.config import Config as IdConfig
from steerscope.studies.reasoning import steps as rst
from steerscope.studies.reasoning.config import Config as ReasoningConfig
from steerscope.studies.reasoning.config import preset

STUDIES = [("reasoning", ReasoningConfig), ("identifiability", IdConfig)]


@pytest.fixture
def vllm_calls(monkeypatch):
    """Calls of the vLLM entry point (no engine): each returns one completion "x" per text."""
    seen: list[dict] = []

    def fake(lm, texts, vector, alpha, max_new_tokens, positions, do_sample, temperature, seed, templated):
        seen.append(dict(texts=list(texts), vector=vector, alpha=alpha, max_new_tokens=max_new_tokens,
                         positions=positions, do_sample=do_sample, temperature=temperature, seed=seed,
                         templated=templated))
        return ["x"] * len(texts)

    monkeypatch.setattr(bv, "generate", fake)
    return seen


@pytest.fixture
def hf_calls(monkeypatch, tiny_llama):
    """Calls of HF ``generate`` on the tiny model (it still runs)."""
    seen: list[int] = []
    real = tiny_llama.model.generate

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tiny_llama.model, "generate", spy)
    return seen


@pytest.mark.parametrize("study,cls", STUDIES)
def test_study_command_lines_take_backend(study, cls):
    from steerscope.cli import build_parser

    p = build_parser()
    assert cls.from_args(p.parse_args(["study", study, "--backend", "vllm"])).backend == "vllm"
    assert cls.from_args(p.parse_args(["study", study])).backend == "hf"
    with pytest.raises(ss.SteerscopeError, match="invalid choice"):
        p.parse_args(["study", study, "--backend", "tgi"])


@pytest.mark.parametrize("study,cls", STUDIES)
def test_resume_ignores_the_backend(study, cls, tmp_path):
    hf, vl = cls(), replace(cls(), backend="vllm")
    assert "backend" not in hf.identity() and hf.identity() == vl.identity()

    def boom() -> dict:
        raise AssertionError("a finished step was recomputed after switching the backend")

    with Run(tmp_path, config=hf.identity()) as run:
        run.step("gen", lambda: {"texts": ["a"]})
    with Run(tmp_path, config=vl.identity()) as run:
        assert run.step("gen", boom)["texts"] == ["a"]
    with pytest.raises(StudyError, match="another configuration"):
        Run(tmp_path, config=replace(vl, seed=1).identity())


def test_reasoning_evaluation_runs_on_vllm_where_the_engine_can_steer(tiny_llama, vllm_calls, hf_calls):
    lm = tiny_llama
    cfg = preset("tiny", n_test=3, eval_samples=1, backend="vllm")
    _, test = rst.problems(cfg)
    ev = rst.evaluate(lm, test, cfg, "base")
    assert ev.n == 3 and ev.n_sampled == 3 and not hf_calls
    greedy, sampled = vllm_calls
    assert greedy["texts"] == [lm.format_chat(p.prompt, cfg.system) for p in test] and greedy["templated"]
    assert (greedy["vector"], greedy["alpha"], greedy["positions"], greedy["do_sample"]) == (None, 1.0, "all", False)
    assert greedy["max_new_tokens"] == cfg.max_new_tokens
    assert (sampled["do_sample"], sampled["temperature"], sampled["seed"]) == (True, 1.0, rst.sample_seed(cfg.seed, 0, 0))

    vllm_calls.clear()  # mlp_out below the last layer (resid_pre one up) and of the last (the final norm's input)
    below_last = ss.SteeringVector({lm.n_layers - 2: torch.ones(lm.d_model)}, "mlp_out")
    last = ss.SteeringVector({lm.n_layers - 1: torch.ones(lm.d_model)}, "mlp_out")
    rst.evaluate(lm, test, cfg, "v", below_last, samples=0)
    rst.analysis_texts(lm, cfg, below_last)
    rst.evaluate(lm, test, cfg, "last layer", last, samples=0)
    assert [c["vector"] for c in vllm_calls] == [below_last, below_last, last] and not hf_calls

    vllm_calls.clear()  # what the engine cannot apply stays on HF, and so does everything with backend hf
    gated = SteeringBias(lm, [lm.n_layers - 2], gate=True)
    attn = ss.SteeringVector({1: torch.ones(lm.d_model)}, "attn_out")
    rst.evaluate(lm, test, cfg, "gated", gated.active, samples=0)
    rst.evaluate(lm, test, cfg, "attn_out", attn, samples=0)
    rst.evaluate(lm, test, replace(cfg, backend="hf"), "hf", below_last, samples=0)
    assert not vllm_calls and len(hf_calls) == 3


def test_identifiability_generations_forward_the_backend(tiny_llama, vllm_calls):
    lm, prompts = tiny_llama, ["Tell me about rain.", "Describe a chair."]
    cfg = IdConfig(traits=("formality",), alphas=(2.0, 4.0), max_new_tokens=4, backend="vllm")
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    assert ist.generate_cell(lm, cfg, prompts, None, "formality", 1, 2, cfg.alphas).texts == {"none@0": ["x", "x"]}
    cell = ist.generate_cell(lm, cfg, prompts, v, "formality", 1, 2, cfg.alphas).texts
    assert set(cell) == {f"{c}@{a:g}" for c in ist.CONDITIONS for a in cfg.alphas}
    none, steered = vllm_calls
    assert (none["vector"], none["do_sample"], none["seed"], none["temperature"]) == (None, True, 1, 0.8)
    assert none["texts"] == [lm.format_chat(p) for p in prompts] and none["templated"]
    n = len(ist.CONDITIONS) * len(cfg.alphas) * len(prompts)
    assert len(steered["texts"]) == len(steered["vector"]) == len(steered["alpha"]) == n
    assert steered["alpha"][:4] == [2.0, 2.0, 4.0, 4.0] and all(x.layers == [2] for x in steered["vector"])
    assert torch.equal(steered["vector"][0][2], v)

    vllm_calls.clear()
    hf = ist.generate_cell(lm, replace(cfg, backend="hf"), prompts, v, "formality", 1, 2, cfg.alphas)
    assert not vllm_calls and len(hf.texts) == len(cell)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_mlp_out_steering_equals_resid_pre_one_layer_up(family, smol_tokenizer):
    """The conversion the vLLM backend relies on, checked on HF: post-MLP norms (Gemma 2), parallel blocks (NeoX)."""
    lm = make_tiny(family, tokenizer=smol_tokenizer)
    s = 5 * torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    v = ss.SteeringVector({1: s}, "mlp_out")
    up = bv.as_resid_pre(v, lm.n_layers)
    assert up is not None and up.site == "resid_pre" and up.layers == [2] and torch.equal(up[2], s)
    enc = lm.tokenize(["The quick brown fox jumps over the lazy dog."], templated=False)
    with torch.no_grad():
        base = lm.model(**enc).logits
        with ss.steering(lm, v, 1.0):
            a = lm.model(**enc).logits
        with ss.steering(lm, up, 1.0):
            b = lm.model(**enc).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base, atol=1e-2)
    assert bv.as_resid_pre(ss.SteeringVector({1: s}, "resid_post"), lm.n_layers).layers == [2]
    # the last block's output: the engine's site past the blocks, the final norm's input (vLLM parity: test_vllm_parity)
    assert bv.as_resid_pre(ss.SteeringVector({lm.n_layers - 1: s}, "mlp_out"), lm.n_layers).layers == [lm.n_layers]
    assert bv.as_resid_pre(ss.SteeringVector({1: s}, "attn_out"), lm.n_layers) is None


class FakeEngine:
    """Records registered vectors and generate requests; returns no tokens."""

    def __init__(self) -> None:
        self.registered: dict[str, ss.SteeringVector] = {}
        self.requests: list[tuple] = []

    def register(self, vector: ss.SteeringVector) -> str:
        assert vector.site == "resid_pre", vector.site
        name = f"v{len(self.registered)}"
        self.registered[name] = vector
        return name

    def generate_ids(self, prompts, specs, params):
        self.requests.append((prompts, specs, params))
        return [[] for _ in prompts], 0.0


def test_vllm_generate_sends_per_row_vectors_alphas_and_seeds(tiny_llama, monkeypatch):
    eng = FakeEngine()
    monkeypatch.setattr(bv, "engine_for", lambda lm, **kw: eng)
    lm, d = tiny_llama, tiny_llama.d_model
    a, b = ss.SteeringVector({1: torch.ones(d)}), ss.SteeringVector({2: 2 * torch.ones(d)}, "mlp_out")
    out = ss.generate(lm, ["x", "y", "z"], vector=[a, b, None], alpha=[1.0, -2.0, 0.5],
                      do_sample=True, seed=3, backend="vllm")
    assert out == ["", "", ""]
    _, specs, params = eng.requests[0]
    assert [s["vectors"][0][1] for s in specs[:2]] == [1.0, -2.0] and specs[2] is None
    moved = eng.registered[specs[1]["vectors"][0][0]]
    assert moved.layers == [3] and torch.equal(moved[3], b[2])
    assert params["seeds"] == bv.row_seeds(3, 3) and len(set(params["seeds"])) == 3
    assert bv.row_seeds(3, 3) != bv.row_seeds(4, 3)
    ss.generate(lm, ["x"], vector=a, alpha=2.0, backend="vllm")  # greedy: one spec for all rows, no seeds
    assert eng.requests[-1][1][0]["vectors"][0][1] == 2.0 and "seeds" not in eng.requests[-1][2]
    with pytest.raises(bv.BackendError, match="one per prompt"):
        ss.generate(lm, ["x", "y"], vector=[a], backend="vllm")
    last = ss.SteeringVector({lm.n_layers - 1: torch.ones(d)}, "mlp_out")
    with pytest.raises(bv.BackendError, match="use backend='hf'"):
        bv.Engine.register(eng, last)
