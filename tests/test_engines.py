"""The engine seam (steerscope.backends.base): requests with their own interventions and sampling options,
the HF engine against independent computations, the vLLM engine's refusals (no engine needed)."""

from __future__ import annotations

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.analyses.trainable import SteeringBias
from steerscope.backends import Addition, BackendError, Request, engine, requests
from steerscope.backends.base import groups
from steerscope.backends.hf import BYTE_SLACK, HFEngine
from steerscope.backends.vllm import VLLMEngine
from steerscope.generation import chat_batch
from steerscope.hooks import hook_count
from steerscope.studies.reasoning import steps as rst

PROMPTS = ["Write a formal letter to the board.", "hey whats up", "Tell me about your weekend, please.",
           "What is 2 + 3?"]


@pytest.fixture(scope="module")
def lm(smol_tokenizer):
    return make_tiny("llama", seed=5, tokenizer=smol_tokenizer)


def _bias(lm, gate: bool = False, seed: int = 0) -> SteeringBias:
    bias = SteeringBias(lm, [1, 2], gate=gate)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bias.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return bias


def _vec(lm, layer: int, seed: int) -> ss.SteeringVector:
    return ss.SteeringVector({layer: 3 * torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))})


def test_a_context_factory_request_equals_steering_with_the_same_addition(lm):
    bias = _bias(lm)  # ungated: the same as adding its vector at mlp_out
    n0 = hook_count(lm.model)
    got = HFEngine().generate(lm, [Request(p, bias.active, max_new_tokens=6) for p in PROMPTS])
    assert hook_count(lm.model) == n0
    assert got == ss.generate(lm, PROMPTS, vector=bias.vector(), max_new_tokens=6)
    assert got != ss.generate(lm, PROMPTS, max_new_tokens=6)


def test_each_request_keeps_its_own_intervention_in_a_mixed_call(lm):
    v, w, bias = _vec(lm, 1, 1), _vec(lm, 2, 2), _bias(lm, gate=True)
    add_v, add_w = Addition(v, 2.0), Addition(w, -1.0)
    mixed = [Request(PROMPTS[0], bias.active), Request(PROMPTS[1], add_v), Request(PROMPTS[2], None),
             Request(PROMPTS[3], bias.active), Request(PROMPTS[0], add_w), Request(PROMPTS[1], None, max_new_tokens=3)]
    assert groups(mixed) == [[0, 3], [1, 2, 4], [5]]  # unsteered rows join the additions' batch
    eng = HFEngine()
    out = eng.generate(lm, mixed)
    ctx = eng.generate(lm, [mixed[0], mixed[3]])
    adds = ss.generate(lm, [PROMPTS[1], PROMPTS[2], PROMPTS[0]], vector=[v, v, w], alpha=[2.0, 0.0, -1.0])
    assert out == [ctx[0], adds[0], adds[1], ctx[1], adds[2], ss.generate(lm, PROMPTS[1:2], max_new_tokens=3)[0]]


def test_seeded_sampling_reproduces_and_leaves_the_global_rng_alone(lm):
    reqs = [Request(p, Addition(_vec(lm, 1, 1), 1.5), do_sample=True, temperature=1.3, top_k=20, top_p=0.95,
                    seed=3, max_new_tokens=8) for p in PROMPTS]
    state = torch.get_rng_state()
    a, b = HFEngine().generate(lm, reqs), HFEngine(batch_size=2).generate(lm, reqs)
    assert torch.equal(torch.get_rng_state(), state)
    c = HFEngine().generate(lm, [Request(r.prompt, r.intervention, do_sample=True, temperature=1.3, top_k=20,
                                         top_p=0.95, seed=4, max_new_tokens=8) for r in reqs])
    assert a == HFEngine().generate(lm, reqs) and a != c
    assert len(b) == len(a)  # batches of 2: the same stream across them, other padding


def test_top_k_and_top_p_sampling_is_hf_sampling_after_global_seeding(lm):
    """An independent computation: ``torch.manual_seed`` then HF's own warpers and multinomial draw."""
    enc = chat_batch(lm, PROMPTS)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(11)
        with torch.no_grad():
            ref = lm.model.generate(**enc, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=10,
                                    pad_token_id=lm.tokenizer.pad_token_id)
    finally:
        torch.set_rng_state(state)
    ref_texts = lm.tokenizer.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    got = engine("hf").generate(lm, [Request(p, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, seed=11,
                                             max_new_tokens=10) for p in PROMPTS])
    assert got == ref_texts
    greedy = ss.generate(lm, PROMPTS, max_new_tokens=6)
    assert engine("hf").generate(lm, [Request(p, do_sample=True, top_k=1, seed=0, max_new_tokens=6) for p in PROMPTS]) \
        == greedy


def test_templates_apply_applied_and_none(lm):
    applied = [lm.format_chat(p, "Be brief.") for p in PROMPTS[:2]]
    a = HFEngine().generate(lm, [Request(p, system="Be brief.", max_new_tokens=5) for p in PROMPTS[:2]])
    b = HFEngine().generate(lm, [Request(t, template="applied", max_new_tokens=5) for t in applied])
    c = HFEngine().generate(lm, [Request(p, template="none", max_new_tokens=5) for p in PROMPTS[:2]])
    assert a == b and c == ss.generate(lm, PROMPTS[:2], chat=False, max_new_tokens=5)


def test_the_vllm_engine_refuses_context_factories_and_positions_it_cannot_take(lm):
    bias = _bias(lm)
    with pytest.raises(BackendError, match="context factory.*use backend='hf'"):
        VLLMEngine().generate(lm, [Request("x", bias.active)])
    with pytest.raises(BackendError, match="positions all, prompt or generated"):
        VLLMEngine().generate(lm, [Request("x", Addition(_vec(lm, 1, 1), 1.0, [-1]))])


def test_requests_share_additions_and_check_lengths(lm):
    v, w = _vec(lm, 1, 1), _vec(lm, 2, 2)
    rs = requests(["a", "b", "c"], vector=v, alpha=2.0, positions="prompt", max_new_tokens=4)
    assert rs[0].intervention is rs[2].intervention and rs[0].intervention.positions == "prompt"
    per = requests(["a", "b", "c"], vector=[v, None, w], alpha=[1.0, 5.0, -1.0], do_sample=True, seed=1)
    assert per[1].intervention is None and per[2].intervention.alpha == -1.0 and per[0].seed == 1
    with pytest.raises(BackendError, match="one per prompt"):
        requests(["a", "b"], vector=[v])
    with pytest.raises(ss.SteerscopeError, match="not known"):
        engine("tgi")
    with pytest.raises(ss.SteerscopeError, match="template"):
        Request("a", template="chat")  # type: ignore[arg-type]


def _old_reasoning_loop(lm, texts, factory, max_new_tokens, do_sample, seed, batch_size=50):
    """The reasoning study's own loop before the engine seam (global RNG seeded per batch), restored after."""
    out, state = [], torch.get_rng_state()
    try:
        for i in range(0, len(texts), batch_size):
            enc = lm.tokenize(list(texts[i : i + batch_size]), padding_side="left")
            kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=lm.tokenizer.pad_token_id)
            if do_sample:
                kw.update(temperature=1.0, top_k=0, top_p=1.0)
            torch.manual_seed(seed + i)
            with factory(), torch.no_grad():
                ids = lm.model.generate(**enc, **kw)
            out += lm.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        torch.set_rng_state(state)
    return out


@pytest.mark.parametrize("do_sample", [False, True])
def test_reasoning_generations_on_the_engine_are_those_of_the_old_loop(lm, do_sample):
    bias = _bias(lm, gate=True)
    texts = [lm.format_chat(f"What is {i} + {2 * i}?") for i in range(53)]  # two batches of the study's 50
    state = torch.get_rng_state()
    got = rst._generate(lm, texts, bias.active, 5, do_sample, 17)
    assert torch.equal(torch.get_rng_state(), state)
    assert got == _old_reasoning_loop(lm, texts, bias.active, 5, do_sample, 17)


def test_parallel_sizes_the_model_cannot_take_are_refused_before_any_engine_starts(lm) -> None:
    from steerscope.backends.vllm import check_parallel, cpu_binding, engine_for

    assert check_parallel(lm, {}) == 1 and check_parallel(lm, {"tensor_parallel_size": 2}) == 2  # 4 heads
    for bad, words in (({"tensor_parallel_size": 3}, "does not divide"), ({"tensor_parallel_size": 0}, ">= 1"),
                       ({"tensor_parallel_size": 2.0}, "whole number"), ({"pipeline_parallel_size": 9}, "exceeds")):
        with pytest.raises(BackendError, match=words):
            check_parallel(lm, bad)
        with pytest.raises(BackendError, match=words):  # engine_for refuses before exporting or starting anything
            engine_for(lm, **bad)
    assert cpu_binding(2, [0, 1]) == "0|1" and cpu_binding(2, [4, 5, 6, 7]) == "4,5|6,7"
    assert cpu_binding(3, [0, 1, 2, 3, 4, 5, 6]) == "0,1|2,3|4,5"
    with pytest.raises(BackendError, match="need at least 4 CPUs"):
        cpu_binding(4, [0, 1])


def test_engine_options_belong_to_vllm_and_reach_its_engine(lm) -> None:
    with pytest.raises(ss.SteerscopeError, match="backend='vllm' only"):
        ss.generate(lm, "Hi", max_new_tokens=2, engine_args={"tensor_parallel_size": 2})
    with pytest.raises(ss.SteerscopeError, match="backend='vllm' only"):
        engine("hf", compiled=True)
    eng = engine("vllm", compiled=True, engine_args={"tensor_parallel_size": 2})
    assert isinstance(eng, VLLMEngine) and eng.compiled and eng.engine_args == {"tensor_parallel_size": 2}


def test_serve_passes_tensor_parallelism_through_with_one_cpu_share_per_rank(monkeypatch, tmp_path) -> None:
    from pathlib import Path

    from steerscope.backends import serve as sv

    monkeypatch.setattr(sv, "engine_python", lambda required=True: Path("/venv/bin/python"))
    monkeypatch.setattr(sv, "cpu_binding", lambda ranks, cpus=None: "|".join(str(i) for i in range(ranks)))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    argv, env = sv.serve_argv(str(tmp_path), {}, "127.0.0.1", 8000, "m")
    assert argv[argv.index("--distributed-executor-backend") + 1] == "uni" and "--tensor-parallel-size" not in argv
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env
    argv, env = sv.serve_argv(str(tmp_path), {}, "127.0.0.1", 8000, "m", tensor_parallel_size=2)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "mp" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    argv, _ = sv.serve_argv(str(tmp_path), {}, "127.0.0.1", 8000, "m", tensor_parallel_size=2, executor="ray")
    assert argv.count("--distributed-executor-backend") == 1 and argv[argv.index("--distributed-executor-backend") + 1] == "ray"


@pytest.mark.parametrize("arg", ["--served_model_name=x", "--hos", "--served-model", "--worker_extension_cls",
                                 "--dtyp"])
def test_own_options_in_underscore_or_prefix_spellings_are_refused(arg) -> None:
    """``serve --vllm-args`` guard (no engine needed: it runs wherever the suite runs)."""
    from steerscope.backends.serve import check_extra

    with pytest.raises(BackendError, match="must not contain"):
        check_extra([arg])
    check_extra(["--max-model-len", "2048", "--distributed-executor-backend", "uni"])  # vLLM's own: allowed


def test_serve_loads_exports_and_serves_the_model_in_the_dtype_asked_for(lm, monkeypatch, tmp_path) -> None:
    """``steerscope serve --dtype``: the model loads in that dtype and vLLM gets it as its ``--dtype``; the
    option in --vllm-args is refused (it would silently replace ours)."""
    from pathlib import Path

    from steerscope.backends import serve as sv
    from steerscope.backends import vllm as bvllm
    from steerscope.cli import main

    loaded, exported, started = [], [], []

    def load(name, device="cpu", dtype="float32"):
        loaded.append(dtype)
        return lm

    def execve(path, argv, env):
        started.append(argv)

    monkeypatch.setattr(sv, "engine_python", lambda required=True: Path("/venv/bin/python"))
    monkeypatch.setattr(ss, "load_model", load)
    monkeypatch.setattr(bvllm, "export_folder", lambda m: exported.append(m) or tmp_path)
    monkeypatch.setattr(sv.os, "execve", execve)
    assert main(["serve", "tiny", "--dtype", "bfloat16"]) == 0
    assert loaded == ["bfloat16"] and exported == [lm]
    argv = started[0]
    assert argv.count("--dtype") == 1 and argv[argv.index("--dtype") + 1] == "bfloat16"
    assert main(["serve", "tiny"]) == 0 and loaded[-1] == "float32"
    assert started[-1][started[-1].index("--dtype") + 1] == "float32"
    with pytest.raises(BackendError, match="must not contain --dtype.*steerscope serve --dtype"):
        sv.check_extra(["--dtype=bfloat16"])


def test_the_vllm_export_is_written_beside_its_cache_folder_and_renamed_into_place(lm, monkeypatch, tmp_path) -> None:
    """The first export (no cache folder yet) must not stage in the temp dir: a rename from there to another
    file system fails (EXDEV), which the old code swallowed and then returned a folder that did not exist."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    from steerscope.backends import vllm as bvllm

    cache, elsewhere = tmp_path / "cache", tmp_path / "other-device"
    elsewhere.mkdir()
    monkeypatch.setenv("STEERSCOPE_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    rename = os.rename

    def same_device_only(src, dst, *a, **k):
        if Path(src).resolve().parent != Path(dst).resolve().parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", same_device_only)
    folder = bvllm.export_folder(lm)
    assert folder.parent == cache / "vllm-models" and (folder / "config.json").is_file()
    assert list(folder.parent.iterdir()) == [folder] and not list(elsewhere.iterdir())  # no temp folder left
    assert any(folder.glob("*.safetensors")) and (folder / "tokenizer_config.json").is_file()
    assert bvllm.export_folder(lm) == folder  # cached


def test_pack_keeps_a_group_that_fits_in_order_and_cuts_a_larger_one_within_the_budget():
    from steerscope.backends.hf import pack

    assert pack([3, 1, 2], [9, 4, 7], 8, 3 * 17) == [[3, 1, 2]]  # fits: one call, request order
    lengths = [5, 30, 6, 12, 12, 40, 3, 8]
    got = pack(list(range(8)), lengths, 10, 96)
    assert sorted(i for b in got for i in b) == list(range(8))  # every row once
    for b in got:  # within the budget, except a row that alone exceeds it
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 10) <= 96
    assert [5] in got and len(got) < 8  # 40 + 10 tokens: alone; the short rows share calls


def test_packed_batches_return_each_row_what_it_gets_alone_in_request_order(lm):
    prompts = [PROMPTS[i % 4] * (1 + i % 3) for i in range(7)]  # lengths differ, so packing reorders rows
    v = _vec(lm, 1, 2)
    reqs = [Request(p, Addition(v, 1.5), max_new_tokens=5) for p in prompts]
    packed = HFEngine(token_budget=3 * 60).generate(lm, reqs)
    from steerscope.backends.hf import pack

    enc = [len(lm.tokenize([lm.format_chat(p)])["input_ids"][0]) for p in prompts]
    assert len(pack(list(range(7)), enc, 5, 3 * 60)) > 1  # really more than one call
    assert packed == HFEngine(batch_size=1).generate(lm, reqs)
    assert packed == ss.generate(lm, prompts, vector=v, alpha=1.5, max_new_tokens=5)  # default: one call


def test_a_group_that_surely_fits_the_budget_is_not_tokenized_to_pack_it(lm, monkeypatch):
    texts = [lm.format_chat(p) for p in PROMPTS[:3]]
    first = Request(PROMPTS[0], max_new_tokens=4)
    calls = []
    real = lm.tokenize
    monkeypatch.setattr(lm, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert HFEngine().batches(lm, [0, 1, 2], texts, first) == [[0, 1, 2]] and not calls  # the byte bound fits
    tight = 3 * (max(len(t.encode()) for t in texts) + 4)  # below the byte bound: lengths are needed
    got = HFEngine(token_budget=tight).batches(lm, [0, 1, 2], texts, first)
    assert calls and sorted(i for b in got for i in b) == [0, 1, 2]
    for t in texts:  # the bound holds: no prompt has more tokens than bytes + the slack
        assert len(real([t])["input_ids"][0]) <= len(t.encode()) + BYTE_SLACK


def test_an_engine_that_dies_at_start_is_reported_by_its_last_exception_line() -> None:
    from steerscope.backends.vllm import _cause

    log = ("INFO starting\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           "(EngineCore pid=7) ValueError: current platform cpu does not support ray.\nINFO shutting down\n")
    assert _cause(log) == ": ValueError: current platform cpu does not support ray."
    assert _cause("RuntimeError: first\nvllm.errors.EngineDeadError: second\n") == ": vllm.errors.EngineDeadError: second"
    assert _cause("all fine\n") == ""


def test_compiled_artifacts_live_in_a_cache_folder_per_engine_code_version(monkeypatch, tmp_path) -> None:
    """Engine processes get vLLM's compile cache under a folder named by the hash of steerscope's engine code (a
    change to the steering sites can never load another version's compiled graph); a user's own root is kept."""
    from steerscope.backends import vllm as bv

    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path))
    root = bv.engine_env()["VLLM_CACHE_ROOT"]
    assert root == str(tmp_path / "vllm-compile" / bv.engine_code_hash()) and len(bv.engine_code_hash()) == 16
    fake = tmp_path / "engine"
    fake.mkdir()
    for f in bv.ENGINE_DIR.glob("*.py"):
        (fake / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(bv, "ENGINE_DIR", fake)
    assert bv.engine_code_hash() == root.rsplit("/", 1)[1]  # the same code, the same folder
    (fake / "steerscope_vllm_plugin.py").write_text((fake / "steerscope_vllm_plugin.py").read_text() + "\n# changed\n")
    assert bv.engine_code_hash() != root.rsplit("/", 1)[1]  # any change: another folder
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/mine")
    assert bv.engine_env()["VLLM_CACHE_ROOT"] == "/mine"
