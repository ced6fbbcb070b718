"""`steerscope serve`: per-request steering over HTTP equals the offline (HF) result; bad input gets 400.

Starts the server on 127.0.0.1 (a free port), sends 24 concurrent completion requests (6 prompts x
4 steering configurations, 8 at a time) and checks every answer's token ids against HF generate
under ``ss.steering``; then unknown names / bad alphas / bad positions, which must get HTTP 400
while the server keeps serving. Skipped when the engine environment is absent.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import steerscope as ss
from conftest import ALL_CPUS, every_cpu
from steerscope.backends import vllm as bv

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bv.engine_python(required=False) is None,
                                                   reason="no vLLM engine environment (steerscope vllm-setup)")]

PROMPTS = ["Tell me about your weekend.", "What is the capital of France?", "Write a haiku about rain.",
           "How do I bake bread?", "Name a famous painter.", "Describe the sea in one sentence."]
N_NEW = 16
SRC = Path(__file__).resolve().parent.parent / "src"


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextmanager
def _serving(model: str, vectors: str, log_path: Path, *options: str) -> Iterator[int]:
    """``steerscope serve MODEL --vectors VECTORS OPTIONS`` on a free port until healthy; its port. Stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "steerscope.cli", "serve", model, "--vectors", vectors,
                             "--port", str(port), *options],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(SRC)),
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(3)
        else:
            pytest.fail("server did not come up in 15 min")
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(smol, tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors")
    g = torch.Generator().manual_seed(0)
    vecs = {"a": ss.SteeringVector({12: 10 * (v := torch.randn(smol.d_model, generator=g)) / v.norm()}),
            "b": ss.SteeringVector({k: 5 * (v := torch.randn(smol.d_model, generator=g)) / v.norm() for k in (0, 8, 20)})}
    paths = ",".join(f"{k}={v.save(d / f'{k}.safetensors')}" for k, v in vecs.items())
    with _serving("smollm2-135m", paths, d / "server.log", "--vllm-args", "--max-model-len 1024") as port:
        yield port, vecs


def test_concurrent_steered_requests_equal_offline(server, smol):
    port, vecs = server
    configs = [None, {"vector": "a", "alpha": 1.0}, {"vector": "a", "alpha": -1.0},
               {"vector": ["a", "b"], "alpha": [0.5, 1.0], "positions": "generated"}]
    ids = bv.prompt_ids(smol, [smol.format_chat(p) for p in PROMPTS], True)
    jobs = [(i, c) for c in range(len(configs)) for i in range(len(PROMPTS))]

    def one(job):
        i, c = job
        body = {"model": "smollm2-135m", "prompt": ids[i], "max_tokens": N_NEW, "temperature": 0.0,
                "return_token_ids": True}
        if configs[c] is not None:
            body["steering"] = configs[c]
        status, out = _post(port, body)
        assert status == 200, out
        return out["choices"][0]["token_ids"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    eos = smol.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    for c, cfg in enumerate(configs):
        batch = smol.tokenize([smol.format_chat(p) for p in PROMPTS])
        if cfg is None:
            vec, alpha, pos = None, 1.0, "all"
        elif isinstance(cfg["vector"], str):
            vec, alpha, pos = vecs[cfg["vector"]], cfg["alpha"], "all"
        else:  # two vectors with two alphas = one combined vector at alpha 1
            vec, alpha, pos = 0.5 * vecs["a"] + 1.0 * vecs["b"], 1.0, "generated"
        ctx = ss.steering(smol, vec, alpha, pos) if vec is not None else torch.no_grad()
        with ctx, torch.no_grad():
            out = smol.model.generate(**batch, max_new_tokens=N_NEW, do_sample=False,
                                      pad_token_id=smol.tokenizer.pad_token_id)
        for i, row in enumerate(out[:, batch["input_ids"].shape[1]:].tolist()):
            cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            assert got[c * len(PROMPTS) + i] == row[:cut], f"config {c} prompt {i}"


@pytest.mark.parametrize("steering, reason", [
    ({"vector": "nope", "alpha": 1.0}, "unknown vector"),
    ({"vector": "a", "alpha": "big"}, "finite number"),
    ({"vector": "a", "alpha": 1.0, "positions": "middle"}, "positions"),
    ({"vector": ["a", "b"], "alpha": [1.0]}, "alphas"),
    ("a", "must be an object"),
])
def test_bad_steering_gets_400_and_server_survives(server, steering, reason):
    port, _ = server
    status, out = _post(port, {"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2, "steering": steering})
    assert status == 400
    assert reason in out["error"]["message"] and "\n" not in out["error"]["message"]
    status, _ = _post(port, {"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 2})
    assert status == 200


def _tiny_qwen2_served(smol, tmp_path):
    """The tiny Qwen2 of the parity tests saved as a folder, a vector file for it ("a") and 3 templated prompts."""
    from test_vllm_parity import rand_vec, tiny_qwen2

    tiny = tiny_qwen2(smol.tokenizer)
    folder = tmp_path / "tiny-qwen2"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    vec = rand_vec(tiny, [2], 4.0, 0)
    return tiny, folder, vec, vec.save(tmp_path / "a.safetensors"), [tiny.format_chat(p) for p in PROMPTS[:3]]


@pytest.mark.skipif(len(ALL_CPUS) < 2, reason="tensor parallelism over 2 CPU workers needs 2 CPUs")
def test_serve_at_tensor_parallel_size_2_equals_hf(smol, tmp_path):
    """``steerscope serve FOLDER --tensor-parallel-size 2`` (2 CPU workers, the mp executor): unsteered and
    steered completions token for token the HF path's, on the tiny Qwen2 of the parity tests."""
    from test_vllm_parity import N_NEW as PARITY_NEW
    from test_vllm_parity import hf_ids

    tiny, folder, vec, path, texts = _tiny_qwen2_served(smol, tmp_path)
    with every_cpu(), _serving(str(folder), f"a={path}", tmp_path / "server.log", "--tensor-parallel-size", "2",
                               "--vllm-args", "--max-model-len 512") as port:
        rows = {}
        for steer in (None, {"vector": "a", "alpha": 1.0}):
            got = []
            for i in bv.prompt_ids(tiny, texts, True):
                body = {"model": str(folder), "prompt": i, "max_tokens": PARITY_NEW, "temperature": 0.0,
                        "return_token_ids": True, **({"steering": steer} if steer else {})}
                status, out = _post(port, body)
                assert status == 200, out
                got.append(out["choices"][0]["token_ids"])
            hf = hf_ids(tiny, texts, ss.steering(tiny, vec, 1.0) if steer else None)
            assert got == hf, f"steering {steer}"
            rows[bool(steer)] = hf
        assert rows[True] != rows[False], "the vector must change the text, or the comparison proves nothing"


def test_serve_compiled_equals_hf_with_conditions_and_a_clamp(smol, tmp_path):
    """``steerscope serve FOLDER --compiled`` (vLLM's torch.compile, steered through the graph-safe buffers):
    unsteered, steered, ablated, prompt-gated and clamped completions token for token the HF path's on the tiny
    Qwen2 of the parity tests (3 prompts, the gate open on some), an on="token" condition too; a gate of five
    conditions (the graph holds four) gets a one-line HTTP 400 and the server keeps serving."""
    from test_vllm_parity import N_NEW as PARITY_NEW
    from test_vllm_parity import hf_ids

    tiny, folder, vec, path, texts = _tiny_qwen2_served(smol, tmp_path)
    ids = bv.prompt_ids(tiny, texts, True)
    cases = {"none": (None, None), "steer": ({"vector": "a", "alpha": 1.0}, ss.steering(tiny, vec, 1.0)),
             "ablate": ({"ablate": "a"}, ss.ablation(tiny, vec))}
    with _serving(str(folder), f"a={path}", tmp_path / "server.log", "--compiled",
                  "--vllm-args", "--max-model-len 512") as port:
        rows = {}
        for name, (steer, ctx) in cases.items():
            got = []
            for i in ids:
                body = {"model": str(folder), "prompt": i, "max_tokens": PARITY_NEW, "temperature": 0.0,
                        "return_token_ids": True, **({"steering": steer} if steer else {})}
                status, out = _post(port, body)
                assert status == 200, out
                got.append(out["choices"][0]["token_ids"])
            rows[name] = hf_ids(tiny, texts, ctx)
            assert got == rows[name], f"compiled server, {name}"
        assert rows["steer"] != rows["none"] and rows["ablate"] != rows["none"], "the comparison must be able to fail"
        from test_vllm_conditional import split_condition

        cond, opened = split_condition(tiny, texts, 1, seed=2)
        want = hf_ids(tiny, texts, ss.steering(tiny, vec, 1.0, condition=cond))
        assert any(opened) and not all(opened) and want == [rows["steer" if o else "none"][i]
                                                            for i, o in enumerate(opened)], opened
        got = []
        for i in ids:  # the gate runs in the compiled graph
            status, out = _post(port, {"model": str(folder), "prompt": i, "max_tokens": PARITY_NEW, "temperature": 0.0,
                                       "return_token_ids": True,
                                       "steering": {"vector": "a", "condition": cond.to_dict()}})
            assert status == 200, out
            got.append(out["choices"][0]["token_ids"])
        assert got == want, f"compiled server, condition (open {opened})"
        batch = tiny.tokenize(texts, padding_side="left")
        with torch.no_grad():
            h = tiny.model(**batch, output_hidden_states=True).hidden_states[2][batch["attention_mask"].bool()]
        hi = float((h.float() @ (vec[2] / vec[2].norm())).median())  # binds on about half the prompt tokens
        want = hf_ids(tiny, texts, ss.clamping(tiny, vec, hi=hi))
        assert want != rows["none"], "the clamp must bind, or the comparison proves nothing"
        got = []
        for i in ids:
            status, out = _post(port, {"model": str(folder), "prompt": i, "max_tokens": PARITY_NEW, "temperature": 0.0,
                                       "return_token_ids": True, "steering": {"clamp": {"vector": "a", "hi": hi}}})
            assert status == 200, out
            got.append(out["choices"][0]["token_ids"])
        assert got == want, "compiled server, clamp"
        token, _ = split_condition(tiny, texts, 1, seed=2, on="token", reduce="last")
        want = hf_ids(tiny, texts, ss.steering(tiny, vec, 1.0, condition=token))
        assert want != rows["none"] and want != rows["steer"], "the token gate must open somewhere and shut somewhere"
        got = []
        for i in ids:  # each token decided in the graph on its own score
            status, out = _post(port, {"model": str(folder), "prompt": i, "max_tokens": PARITY_NEW, "temperature": 0.0,
                                       "return_token_ids": True,
                                       "steering": {"vector": "a", "condition": token.to_dict()}})
            assert status == 200, out
            got.append(out["choices"][0]["token_ids"])
        assert got == want, "compiled server, on=token condition"
        five = cond & cond & cond & cond & cond  # more conditions than the graph's 4 leaves
        status, out = _post(port, {"model": str(folder), "prompt": ids[0], "max_tokens": 4,
                                   "steering": {"vector": "a", "condition": five.to_dict()}})
        assert status == 400 and "serve without --compiled" in out["error"]["message"], out
        status, _ = _post(port, {"model": str(folder), "prompt": ids[0], "max_tokens": 4})
        assert status == 200
    log = (tmp_path / "server.log").read_text()
    assert "(compiled)" in log
