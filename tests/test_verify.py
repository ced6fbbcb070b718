"""``steerscope verify`` / ``backends.verify.verify``: a vector file applied as declared on every backend.

Fast tests use a tiny random llama (and simulate backends by monkeypatching); the real agreement tests run
vLLM and llama.cpp on SmolLM2-135M and skip when their environments are absent (as tests/test_vllm_parity.py
and tests/test_reliability_items.py do).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import steerscope as ss
from steerscope.backends import llamacpp
from steerscope.backends import verify as V
from steerscope.backends.vllm import engine_python
from steerscope.cli import main
from steerscope.errors import VectorError
from steerscope.vector import Use


def _vec(lm, layer: int, site: str = "resid_pre", use: Use | None = None, seed: int = 0) -> ss.SteeringVector:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(lm.d_model, generator=g)
    prov = ss.Provenance.for_model(lm, use=use)
    return ss.SteeringVector({layer: 4.0 * d / d.norm()}, site, prov)


def _absent(monkeypatch) -> None:
    """Neither vLLM nor llama.cpp installed: env vars pointing at pythons that do not exist."""
    monkeypatch.setenv("STEERSCOPE_VLLM_ENV", "/nonexistent/vllm-env")
    monkeypatch.setenv("STEERSCOPE_LLAMACPP", "/nonexistent/bin/python")


# -- the plan ------------------------------------------------------------------------------------------------
def test_plan_takes_the_use_record_and_alpha_overrides_it(tiny_llama):
    vec = _vec(tiny_llama, 2, use=Use(layers=[2], alpha=3.0, positions="prompt"))
    plan = V.plan_for(vec)
    assert (plan.operation, plan.site, plan.layers, plan.positions, plan.alpha, plan.source) == \
        ("add", "resid_pre", [2], "prompt", 3.0, "use record")
    assert V.plan_for(vec, alpha=-1.5).alpha == -1.5 and V.plan_for(vec, alpha=-1.5).source == "argument"
    plain = V.plan_for(_vec(tiny_llama, 2), alpha=2.0)
    assert (plain.operation, plain.positions, plain.layers) == ("add", "all", [2])


def test_no_use_record_and_no_alpha_is_refused(tiny_llama):
    with pytest.raises(VectorError, match="--alpha"):
        V.plan_for(_vec(tiny_llama, 2))


def test_cli_without_use_record_or_alpha_exits_2_in_one_line(tiny_llama, tmp_path, capsys):
    path = _vec(tiny_llama, 2).save(tmp_path / "v.safetensors")
    assert main(["verify", str(path), "--model", "/nonexistent/model"]) == 2  # refused before the model loads
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "pass --alpha" in err


# -- HF only, and backends that are absent -------------------------------------------------------------------
def test_hf_only_verify_agrees_and_exits_0(tiny_folder, tiny_llama, tmp_path, capsys, monkeypatch):
    _absent(monkeypatch)
    path = _vec(tiny_llama, 2, use=Use(layers=[2], alpha=2.0)).save(tmp_path / "v.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nWhat is rain?\n")
    assert main(["verify", str(path), "--model", str(tiny_folder), "--backends", "hf", "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and [b["backend"] for b in out["backends"]] == ["hf"]
    assert out["backends"][0]["identical"] == out["backends"][0]["n"] == 2
    assert out["plan"]["alpha"] == 2.0 and out["plan"]["source"] == "use record"


def test_a_plan_that_changes_no_tokens_is_flagged_as_vacuous(tiny_folder, tiny_llama, tmp_path, capsys,
                                                              monkeypatch):
    _absent(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello there\nWhat is rain?\n")
    for alpha, changed in ((1e-6, 0), (40.0, None)):
        path = _vec(tiny_llama, 1, use=Use(layers=[1], alpha=alpha)).save(tmp_path / f"v{alpha}.safetensors")
        argv = ["verify", str(path), "--model", str(tiny_folder), "--backends", "hf", "--prompts", str(prompts),
                "--max-new-tokens", "6"]
        assert main([*argv, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["changed"] == changed if changed is not None else out["changed"] >= 1
        assert out["vacuous"] is (changed == 0)
        main(argv)
        assert ("warning: the steering changes no prompt's tokens" in capsys.readouterr().out) is (changed == 0)


def test_absent_backends_are_skipped_with_the_install_command(tiny_folder, tiny_llama, tmp_path, capsys,
                                                              monkeypatch):
    _absent(monkeypatch)
    path = _vec(tiny_llama, 2).save(tmp_path / "v.safetensors")
    assert main(["verify", str(path), "--model", str(tiny_folder), "--alpha", "2", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "vllm       skipped" in out and "llamacpp   skipped" in out
    assert "steerscope vllm-setup" in out and f"llama-cpp-python=={llamacpp.VERSION}" in out


def test_a_control_vector_gguf_is_verified_by_its_travelling_use_record(tiny_folder, tiny_llama, tmp_path, capsys,
                                                                           monkeypatch):
    _absent(monkeypatch)
    path = _vec(tiny_llama, 2, use=Use(layers=[2], alpha=1.5)).export_gguf(tmp_path / "v.gguf")
    assert main(["verify", str(path), "--model", str(tiny_folder), "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["layers"] == [2] and out["plan"]["alpha"] == 1.5 and out["ok"]


# -- refusals ------------------------------------------------------------------------------------------------
def test_llamacpp_refuses_what_a_control_vector_cannot_do():
    assert llamacpp.refusal("add", "resid_pre", [12], "all") is None
    assert llamacpp.refusal("add", "resid_post", [11], "all") is None
    assert "site is mlp_out" in llamacpp.refusal("add", "mlp_out", [12], "all")
    assert "only add" in llamacpp.refusal("ablate", "resid_pre", [12], "all")
    assert "every position" in llamacpp.refusal("add", "resid_pre", [12], "prompt")
    assert "direction.0" in llamacpp.refusal("add", "resid_pre", [1], "all")


def test_refusals_are_one_line_per_backend_and_not_failures(tiny_llama, monkeypatch):
    """llama.cpp refuses a non-residual site and an ablation; vLLM refuses clamping and last-K (both "installed")."""
    monkeypatch.setattr(llamacpp, "missing", lambda lm=None: None)
    monkeypatch.setattr("steerscope.backends.vllm.engine_python", lambda required=True: "/fake/python")
    kw = dict(prompts=["Hello there"], max_new_tokens=2)
    mlp = V.verify(tiny_llama, _vec(tiny_llama, 1, "attn_out"), alpha=1.0, **kw)
    ablate = V.verify(tiny_llama, _vec(tiny_llama, 2, use=Use(operation="ablate", layers=[2])), ["hf", "llamacpp"],
                      **kw)
    clamp = V.verify(tiny_llama, _vec(tiny_llama, 2, use=Use(operation="clamp", layers=[2], alpha=1.0)), **kw)
    for res, backend, why in ((mlp, "llamacpp", "site is attn_out"), (mlp, "vllm", "attn_out"),
                              (ablate, "llamacpp", "only add"), (clamp, "vllm", "cannot clamp"),
                              (clamp, "llamacpp", "only add")):
        b = next(b for b in res.backends if b.backend == backend)
        assert b.status == "refused" and why in b.reason and "\n" not in b.reason, (backend, b)
        assert res.ok
    last = V.verify(tiny_llama, _vec(tiny_llama, 2, use=Use(layers=[2], alpha=1.0, positions="last-2")), **kw)
    assert [b.status for b in last.backends] == ["reference", "refused", "refused"]


def test_a_differing_backend_exits_2_naming_it_and_the_prompt(tiny_folder, tiny_llama, tmp_path, capsys,
                                                              monkeypatch):
    """A backend whose tokens differ on the second prompt (simulated) makes verify exit 2 with one line."""
    _absent(monkeypatch)
    monkeypatch.setattr("steerscope.backends.vllm.engine_python", lambda required=True: "/fake/python")

    def fake(lm, vector, plan, ids, n_new):
        ref = V.hf_tokens(lm, vector, plan, ids, n_new)
        ref[1] = ref[1][:1] + [ref[1][1] + 1] + ref[1][2:]
        return ref

    monkeypatch.setattr(V, "run_vllm", fake)
    path = _vec(tiny_llama, 2).save(tmp_path / "v.safetensors")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there"}\n{"prompt": "What is rain?"}\n')
    assert main(["verify", str(path), "--model", str(tiny_folder), "--alpha", "2", "--backends", "hf,vllm",
                 "--prompts", str(prompts), "--max-new-tokens", "4"]) == 2
    cap = capsys.readouterr()
    assert "vllm       DIFFER" in cap.out and "1/2" in cap.out
    err = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "vllm DIFFERS from hf at prompt 1" in err[0] and "token 1" in err[0]


# -- the real engines (slow; skipped without their environments) --------------------------------------------
def _formality(lm, layer: int = 12) -> ss.SteeringVector:
    from steerscope.data import data_path, read_jsonl

    pairs = read_jsonl(data_path("traits", "formality.jsonl"))[:16]
    vec = ss.extract(lm, [p["positive"] for p in pairs], [p["negative"] for p in pairs], layers=[layer])
    return ss.SteeringVector(vec.directions, vec.site, replace(vec.provenance, use=Use(layers=[layer], alpha=4.0)))


def _llamacpp_ready() -> bool:
    return llamacpp.missing() is None


@pytest.mark.slow
@pytest.mark.skipif(engine_python(required=False) is None,
                    reason="no vLLM engine environment (steerscope vllm-setup, or STEERSCOPE_VLLM_ENV)")
def test_vllm_agrees_with_hf_on_a_tuned_vector(smol):
    vec = _formality(smol)
    res = V.verify(smol, vec, ["hf", "vllm"], max_new_tokens=24)
    b = res.backends[1]
    print(f"vllm: {b.status} {b.identical}/{len(b.prompts)}")
    assert res.ok and b.status == "agree" and b.identical == len(res.prompts) == 6
    prompt_only = replace(vec.provenance.use, alpha=8.0, positions="prompt")  # the record's scope travels too
    vec2 = ss.SteeringVector(vec.directions, vec.site, replace(vec.provenance, use=prompt_only))
    res2 = V.verify(smol, vec2, ["hf", "vllm"], max_new_tokens=16)
    assert res2.plan.positions == "prompt" and res2.ok and res2.backends[1].status == "agree"


@pytest.mark.slow
@pytest.mark.skipif(not _llamacpp_ready(), reason="needs STEERSCOPE_LLAMACPP (a python with llama_cpp) and "
                    "LLAMACPP_CONVERT (llama.cpp's convert_hf_to_gguf.py); see .ci/llamacpp.sh")
def test_llamacpp_agrees_with_hf_and_a_wrong_layer_is_caught(smol, monkeypatch):
    vec = _formality(smol)
    res = V.verify(smol, vec, ["hf", "llamacpp"], max_new_tokens=24)
    lc = res.backends[1]
    print(f"llamacpp: {lc.status} {lc.identical}/{len(lc.prompts)} delta rel err {lc.delta_rel_err:.3g}")
    assert res.ok and lc.status == "agree" and lc.identical == 6 and lc.delta_rel_err < 0.02
    real = llamacpp.control_buffer

    def off_by_one(vector, n_embd, strength):  # a file whose llama.cpp layer is one block late
        return real(ss.SteeringVector({k + 1: vector[k] for k in vector.layers}), n_embd, strength)

    monkeypatch.setattr(llamacpp, "control_buffer", off_by_one)
    wrong = V.verify(smol, vec, ["hf", "llamacpp"], max_new_tokens=24)
    lw = wrong.backends[1]
    print(f"wrong layer: {lw.status} {lw.identical}/{len(lw.prompts)} delta rel err {lw.delta_rel_err:.3g}")
    assert lw.status == "DIFFER" and lw.delta_rel_err > 5 * lc.delta_rel_err
    assert "llamacpp DIFFERS" in wrong.failure()
