"""The steered server's request handling without vLLM (issue 26): body cap (413), deep or huge JSON,
400-digit and overflowing alphas, zero-vector ablation (400), and a server-side ``cache_salt`` on every
request. The middleware module runs in the engine environment; its request functions need only torch."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import torch

import steerscope as ss
from steerscope.backends.vllm import ENGINE_DIR

sys.path.insert(0, str(ENGINE_DIR))
import steerscope_vllm_server as srv  # the engine-side module (on the engine's PYTHONPATH)

KNOWN = {"a", "z"}
NORMS = {"a": (10.0, 10.0), "z": (0.0, 0.0)}


def _steer(**steering) -> dict:
    return srv.rewrite({"prompt": "Hi", "steering": steering}, KNOWN, NORMS)


def test_every_request_gets_a_server_side_salt_that_no_client_salt_can_forge() -> None:
    steered = _steer(vector="a", alpha=2)
    plain = srv.rewrite({"prompt": "Hi"}, KNOWN, NORMS)
    assert steered["cache_salt"].startswith("steerscope-") and plain["cache_salt"].startswith("steerscope-")
    assert steered["cache_salt"] != plain["cache_salt"]
    forged = srv.rewrite({"prompt": "Hi", "cache_salt": steered["cache_salt"]}, KNOWN, NORMS)
    assert forged["cache_salt"] not in (steered["cache_salt"], plain["cache_salt"])
    again = srv.rewrite({"prompt": "Hi", "cache_salt": steered["cache_salt"], "steering": {"vector": "a", "alpha": 2}},
                        KNOWN, NORMS)
    assert again["cache_salt"] not in (steered["cache_salt"], forged["cache_salt"])  # a tenant salt still separates
    assert _steer(vector="a", alpha=2)["cache_salt"] == steered["cache_salt"]  # one salt per configuration
    assert _steer(vector="a", alpha=3)["cache_salt"] != steered["cache_salt"]


@pytest.mark.parametrize("steering, reason", [
    ({"vector": "a", "alpha": 10 ** 400}, "too large for a float"),
    ({"vector": "a", "alpha": [10 ** 400]}, "too large for a float"),
    ({"vector": "a", "alpha": 1e308}, "overflows float32"),
    ({"vector": "a", "alpha": -1e38}, "overflows float32"),
    ({"vector": "a", "alpha": "4"}, "finite number"),
    ({"ablate": "z"}, "zero direction"),
])
def test_absurd_alphas_and_zero_vector_ablation_are_refused_with_a_reason(steering, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        _steer(**steering)


def test_a_raw_xargs_spec_with_a_huge_integer_or_deep_json_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="too large"):
        srv.rewrite({"vllm_xargs": {"steerscope": json.dumps({"vectors": [["a", 10 ** 400]]})}}, KNOWN, NORMS)
    with pytest.raises(ValueError, match="nested too deeply"):
        srv.rewrite({"vllm_xargs": {"steerscope": "[" * 100_000}}, KNOWN, NORMS)


def test_parse_body_refuses_deep_and_invalid_json_with_400() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b"{not json", b"\xff\xfe"):
        with pytest.raises(srv.RequestError) as e:
            srv.parse_body(body)
        assert e.value.status == 400


def _receive(chunks: list[bytes]):
    msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return msgs.pop(0)
    return receive


def test_read_body_caps_the_size_with_413_and_joins_chunks_once() -> None:
    chunks = [b"x" * 1000] * 50
    assert asyncio.run(srv.read_body({"headers": []}, _receive(chunks), 50_000)) == b"x" * 50_000
    with pytest.raises(srv.RequestError) as e:
        asyncio.run(srv.read_body({"headers": []}, _receive(chunks), 49_999))
    assert e.value.status == 413
    with pytest.raises(srv.RequestError) as e:  # refused from the header, before any chunk is read
        asyncio.run(srv.read_body({"headers": [(b"content-length", b"99999999")]}, _receive([]), 1000))
    assert e.value.status == 413


def _call(mw: srv.SteerMiddleware, body: bytes, chunk: int = 65536) -> tuple[int, dict, list]:
    sent: list[dict] = []
    forwarded: list = []

    async def app(scope, receive, send):
        forwarded.append(json.loads((await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(msg):
        sent.append(msg)

    async def run():
        mw._installed = True  # no engine to hook
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "app": None}
        await mw(scope, _receive([body[i:i + chunk] for i in range(0, max(len(body), 1), chunk)]), send)

    mw.app = app
    asyncio.run(run())
    status = sent[0]["status"]
    reply = json.loads(sent[1]["body"]) if len(sent) > 1 else {}
    return status, reply, forwarded


def test_the_middleware_answers_413_400_and_forwards_a_salted_body(tmp_path) -> None:
    zero = ss.SteeringVector({1: torch.zeros(8)}).save(tmp_path / "z.safetensors")
    a = ss.SteeringVector({1: torch.ones(8)}).save(tmp_path / "a.safetensors")
    mw = srv.SteerMiddleware(None, vectors={"a": str(a), "z": str(zero)}, max_body=1 << 20, check=False)
    assert mw.norms["z"] == (0.0, 0.0)
    status, reply, _ = _call(mw, b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and "limit" in reply["error"]["message"]
    for body in (b"[" * 100_000, json.dumps({"steering": {"vector": "a", "alpha": 10 ** 400}}).encode(),
                 json.dumps({"steering": {"ablate": "z"}}).encode(),
                 json.dumps({"steering": {"vector": "a", "alpha": 1e308}}).encode()):
        status, reply, fwd = _call(mw, body)
        assert status == 400 and reply["error"]["code"] == 400 and not fwd
        assert "\n" not in reply["error"]["message"]
    status, _, fwd = _call(mw, json.dumps({"prompt": "Hi", "cache_salt": "mine"}).encode())
    assert status == 200 and fwd[0]["cache_salt"].startswith("steerscope-") and fwd[0]["cache_salt"] != "mine"


def test_the_middleware_takes_a_condition_and_a_clamp_and_answers_400_for_bad_ones(tmp_path) -> None:
    """``steering.condition`` (Condition.to_dict JSON) and ``steering.clamp`` reach the worker as its spec; a gated
    request gets a salt of its own (its gate reads every prompt token); bad ones get a one-line 400."""
    a = ss.SteeringVector({2: torch.ones(8)}).save(tmp_path / "a.safetensors")
    mw = srv.SteerMiddleware(None, vectors={"a": str(a)}, check=False)
    cond = ss.Condition(torch.ones(8), layer=1, threshold=0.5).to_dict()
    good = {"prompt": "Hi", "steering": {"vector": "a", "alpha": 2, "condition": {"kind": "not", "of": cond},
                                         "clamp": {"vector": "a", "lo": -1, "hi": 1, "condition": cond}}}
    salts = []
    for _ in range(2):
        status, _, fwd = _call(mw, json.dumps(good).encode())
        spec = json.loads(fwd[0]["vllm_xargs"]["steerscope"])
        assert status == 200 and spec["condition"]["kind"] == "not" and spec["clamp"]["hi"] == 1
        salts.append(fwd[0]["cache_salt"])
    assert salts[0] != salts[1]
    status, _, fwd = _call(mw, json.dumps({"prompt": "Hi", "steering": {"clamp": {"vector": "a", "hi": 3}}}).encode())
    assert status == 200 and json.loads(fwd[0]["vllm_xargs"]["steerscope"])["clamp"]["vector"] == "a"
    high = dict(cond, layer=3)  # reads above the steered layer 2
    for steering, words in (({"vector": "a", "condition": dict(cond, direction=[1.0] * 4)}, "dims"),
                            ({"vector": "a", "condition": high}, "steering starts at layer 2"),
                            ({"vector": "a", "condition": {"kind": "maybe"}}, "not known"),
                            ({"vector": "a", "clamp": {"vector": "a"}}, "lo, hi"),
                            ({"condition": cond, "clamp": {"vector": "a", "hi": 1}}, "own 'condition'")):
        status, reply, fwd = _call(mw, json.dumps({"prompt": "Hi", "steering": steering}).encode())
        assert status == 400 and not fwd and words in reply["error"]["message"], reply
        assert "\n" not in reply["error"]["message"]


def test_a_compiled_server_runs_prompt_conditions_and_clamps_refuses_the_rest_in_one_line_and_forwards_plain_steering(tmp_path,
                                                                                               monkeypatch) -> None:
    a = ss.SteeringVector({2: torch.ones(8)}).save(tmp_path / "a.safetensors")
    monkeypatch.setenv("STEERSCOPE_VLLM_GRAPH", "LlamaForCausalLM;ablate")  # an engine built without gate sites
    mw = srv.SteerMiddleware(None, vectors={"a": str(a)}, check=False)
    cond = ss.Condition(torch.ones(8), layer=1, threshold=0.5).to_dict()
    for steering in ({"vector": "a", "condition": cond}, {"clamp": {"vector": "a", "hi": 1}}):
        status, reply, fwd = _call(mw, json.dumps({"prompt": "Hi", "steering": steering}).encode())
        assert status == 400 and not fwd and "without gate sites" in reply["error"]["message"], reply
        assert "\n" not in reply["error"]["message"]
    status, _, fwd = _call(mw, json.dumps({"prompt": "Hi", "steering": {"vector": "a", "alpha": 2}}).encode())
    assert status == 200 and json.loads(fwd[0]["vllm_xargs"]["steerscope"])["vectors"] == [["a", 2]]
    monkeypatch.setenv("STEERSCOPE_VLLM_GRAPH", "LlamaForCausalLM;ablate,gates")  # what `serve --compiled` sets
    gated = srv.SteerMiddleware(None, vectors={"a": str(a)}, check=False)
    status, _, fwd = _call(gated, json.dumps({"prompt": "Hi", "steering": {"vector": "a", "condition": cond}}).encode())
    assert status == 200 and json.loads(fwd[0]["vllm_xargs"]["steerscope"])["condition"] == cond  # runs in the graph
    status, _, fwd = _call(gated, json.dumps({"prompt": "Hi", "steering": {"clamp": {"vector": "a", "hi": 1}}}).encode())
    assert status == 200 and json.loads(fwd[0]["vllm_xargs"]["steerscope"])["clamp"]["hi"] == 1
    token = {**cond, "on": "token"}
    status, _, fwd = _call(gated, json.dumps({"prompt": "Hi", "steering": {"vector": "a", "condition": token}}).encode())
    assert status == 200 and json.loads(fwd[0]["vllm_xargs"]["steerscope"])["condition"] == token  # in the graph too
    five = token
    for _ in range(4):
        five = {"kind": "and", "a": cond, "b": five}
    status, reply, fwd = _call(gated, json.dumps({"prompt": "Hi", "steering": {"vector": "a", "condition": five}}).encode())
    assert status == 400 and not fwd and "5 conditions" in reply["error"]["message"], reply
    assert "serve without --compiled" in reply["error"]["message"]
    monkeypatch.delenv("STEERSCOPE_VLLM_GRAPH")
    eager = srv.SteerMiddleware(None, vectors={"a": str(a)}, check=False)
    status, _, _ = _call(eager, json.dumps({"prompt": "Hi", "steering": {"vector": "a", "condition": cond}}).encode())
    assert status == 200  # the eager server runs them


def test_serve_compiled_drops_enforce_eager_and_builds_the_graph_sites(tmp_path, monkeypatch) -> None:
    from steerscope.backends import serve as sv

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    monkeypatch.setattr(sv, "engine_python", lambda *a, **k: "/venv/bin/python")
    eager, env_e = sv.serve_argv(str(tmp_path), {}, "127.0.0.1", 8000, "m")
    comp, env_c = sv.serve_argv(str(tmp_path), {}, "127.0.0.1", 8000, "m", compiled=True)
    assert "--enforce-eager" in eager and "--enforce-eager" not in comp
    assert "STEERSCOPE_VLLM_GRAPH" not in env_e and env_c["STEERSCOPE_VLLM_GRAPH"] == "Qwen2ForCausalLM;ablate,gates"
