"""A prepared GPU check (issue 27): one script, one JSON, under 8 minutes on one H200.

The GPU machine has torch and transformers but no network, so nothing is downloaded: models are
random-initialised from configs with the shapes of Llama-3.2-3B and Gemma-2-2B (rope scaling is
left out: it changes no shape and no cost), and the tokenizer is a byte-level one built here
(one token per byte, a two-line chat template). Per shape, in ``--dtype`` on ``--device``:

1. ``generation``: greedy ``generate`` unsteered vs inside ``ss.steering`` (a random direction
   at ``n_layers // 2``, norm 4x the residual's, all positions) at batch 1 and 64, ``--tokens``
   new tokens each (EOS disabled so every row runs the full length); rounds interleaved, the
   median of the per-round ratios steered / unsteered and tokens/s.
2. ``eap_ig``: ``circuits.prepare`` then ``circuits.eap_ig`` (T = 10) on 4 prompts x 16 new
   tokens: time, peak device memory, scored positions, and the s node's score beside the metric
   gap it should approach (completeness).
3. ``frozen``: QK- and OV-frozen generation vs plain steered generation (16 prompts x 32 tokens),
   time ratios and which path ran.

And once, on a tiny Llama and a tiny Gemma-2 config (``parity``, ``circuits_parity``): the same weights in float32 on
the CPU and in float32 and ``--dtype`` on ``--device``; the largest difference of steered logits
and of the steering delta (steered minus unsteered), relative to the largest magnitude, and
whether the unsteered logits after the ``steering`` context are bit-identical to before (state
restored); and in float32, EAP-IG edge scores, exact edge and node patching and a circuit's patched
metric on the device vs the CPU on one teacher-forced batch; ``library``: extract, generate, ablation,
recording and a quick explain card on a tiny model on the device vs the CPU. ``matmul_tflops`` is a bf16 8192^3 product's rate on the device (the physical anchor).

Usage:
    python benchmarks/gpu_check.py --out gpu_check.json          # CUDA, bf16, both shapes
    python benchmarks/gpu_check.py --tiny --device cpu            # what tests/test_gpu_check.py runs
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-3b": ("llama", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                   max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "gemma-2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
}
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
    "tiny-gemma2": ("gemma2", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                   query_pre_attn_scalar=16, max_position_embeddings=512)),
}
PROMPTS = ["How do I bake bread at home?", "Write a short poem about the sea.", "What is the capital of France?",
           "Explain photosynthesis to a child.", "Give me three tips for a job interview.",
           "Translate 'good morning' into Spanish.", "Why is the sky blue?", "Summarise the plot of Hamlet."]


def toy_tokenizer() -> Any:
    """A byte-level tokenizer with no merges (ids 0-2 special, then the 256 byte symbols) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    return fast


def build(family: str, kw: dict[str, Any], device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A random-initialised causal LM of ``family`` built directly on ``device`` in ``dtype``, wrapped as ``ss.LM``."""
    import transformers as tr

    import steerscope as ss

    cls = {"llama": tr.LlamaConfig, "gemma2": tr.Gemma2Config}[family]
    cfg = cls(**kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = tr.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # every row generates the full length
    model.generation_config.pad_token_id = 0
    return ss.from_hf(model.eval(), toy_tokenizer(), name=f"random-{family}")


def copied(ref: Any, device: str, dtype: torch.dtype | None = None) -> Any:
    """A copy of the CPU reference ``ref`` (an ``ss.LM``) on ``device`` (in ``dtype``; None: the reference's)."""
    import copy

    import steerscope as ss

    return ss.from_hf(copy.deepcopy(ref.model).to(device=device, dtype=dtype or ref.dtype), ref.tokenizer, name=ref.name)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def probe_vector(lm: Any, scale: float = 4.0) -> Any:
    """A seeded random direction at ``n_layers // 2`` with ``scale`` x the mean residual norm at the last prompt position."""
    import steerscope as ss
    from steerscope.generation import chat_batch

    layer = lm.n_layers // 2
    with torch.no_grad():
        hs = lm.model(**chat_batch(lm, PROMPTS), output_hidden_states=True).hidden_states[layer][:, -1]
    g = torch.Generator().manual_seed(1)
    u = torch.randn(lm.d_model, generator=g)
    norm = float(hs.float().norm(dim=-1).mean())
    return ss.SteeringVector({layer: (u / u.norm() * scale * norm).to(lm.dtype)}), norm


def generation(lm: Any, vec: Any, device: str, batches: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    """Unsteered vs steered greedy generate, rounds interleaved; the median per-round ratio."""
    import steerscope as ss
    from steerscope.generation import chat_batch

    out: dict[str, Any] = {}
    for b in batches:
        enc = chat_batch(lm, [PROMPTS[i % len(PROMPTS)] for i in range(b)])

        def gen(enc: Any = enc) -> torch.Tensor:
            return lm.model.generate(**enc, max_new_tokens=tokens, do_sample=False, pad_token_id=0)

        def steered() -> torch.Tensor:
            with ss.steering(lm, vec, alpha=1.0):
                return gen()
        gen(), steered()  # warm-up (kernels, allocator)
        t_plain, t_steer, n_new = [], [], 0
        for _ in range(rounds):
            t, ids = timed(gen, device)
            t_plain.append(t)
            t, ids_s = timed(steered, device)
            t_steer.append(t)
            n_new = int(ids.shape[1] - enc["input_ids"].shape[1])
        ratios = [s / p for s, p in zip(t_steer, t_plain)]
        out[f"batch_{b}"] = {
            "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": n_new, "rounds": rounds,
            "t_unsteered_s": round(statistics.median(t_plain), 4), "t_steered_s": round(statistics.median(t_steer), 4),
            "tokens_per_s_unsteered": round(b * n_new / statistics.median(t_plain), 1),
            "tokens_per_s_steered": round(b * n_new / statistics.median(t_steer), 1),
            "ratio_steered_median": round(statistics.median(ratios), 4), "ratio_steered_max": round(max(ratios), 4),
            "steered_tokens_differ": bool((ids != ids_s).any()),
        }
    return out


def eap_ig(lm: Any, vec: Any, device: str, n: int = 4, tokens: int = 16, steps: int = 10) -> dict[str, Any]:
    from steerscope import circuits as C

    reset_peak(device)
    t_prep, pb = timed(lambda: C.prepare(lm, PROMPTS[:n], vec, 1.0, max_new_tokens=tokens), device)
    t, att = timed(lambda: C.eap_ig(lm, pb, vec, 1.0, steps=steps, batch_size=n), device)
    return {"prompts": n, "new_tokens": tokens, "steps": steps, "t_prepare_s": round(t_prep, 3),
            "t_eap_ig_s": round(t, 3), "peak_gib": peak_gib(device), "scored_positions": int(pb.mask.sum()),
            "n_edges": int(att.graph.n_edges), "m_clean": round(att.m_clean, 4), "m_corrupt": round(att.m_corrupt, 4),
            "s_node_score": round(float(att.nodes[0]), 4), "metric_gap": round(att.m_clean - att.m_corrupt, 4),
            "edges_finite": bool(torch.isfinite(att.edges).all())}


def frozen(lm: Any, vec: Any, device: str, n: int = 16, tokens: int = 32, rounds: int = 2) -> dict[str, Any]:
    from steerscope.analyses import frozen as F

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    for m in ("none", "qk", "ov"):  # warm-up
        F.frozen_generate_ids(lm, prompts, vec, 1.0, mode=m, max_new_tokens=2)
    best = {m: float("inf") for m in ("none", "qk", "ov")}
    reset_peak(device)
    for _ in range(rounds):
        for m in best:
            t, _ids = timed(lambda m=m: F.frozen_generate_ids(lm, prompts, vec, 1.0, mode=m, max_new_tokens=tokens),
                            device)
            best[m] = min(best[m], t)
    return {"prompts": n, "new_tokens": tokens, "path": "fast" if not F._fast_missing(lm) else "doubled-generate",
            "t_plain_s": round(best["none"], 4), "t_qk_s": round(best["qk"], 4), "t_ov_s": round(best["ov"], 4),
            "ratio_qk": round(best["qk"] / best["none"], 3), "ratio_ov": round(best["ov"] / best["none"], 3),
            "peak_gib": peak_gib(device)}


def _logits(lm: Any, enc: Any, vec: Any | None) -> torch.Tensor:
    import steerscope as ss

    with torch.no_grad():
        if vec is None:
            return lm.model(**enc).logits.float().cpu()
        with ss.steering(lm, vec, alpha=1.0):
            return lm.model(**enc).logits.float().cpu()


def _rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask].abs().max() / b[mask].abs().max().clamp_min(1e-30))


def parity(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Tiny Llama and Gemma-2: steered logits and steering deltas on ``device`` vs the CPU float32 path."""

    import steerscope as ss
    from steerscope.generation import chat_batch

    out: dict[str, Any] = {}
    for name, (family, kw) in TINY.items():
        ref = build(family, kw, "cpu", torch.float32, seed=3)
        with torch.no_grad():  # norms away from 1 so that norm weights matter
            for pname, p in ref.model.named_parameters():
                if "norm" in pname:
                    p.add_(0.3 * torch.randn_like(p))
        vec, _ = probe_vector(ref)
        enc = chat_batch(ref, PROMPTS[:4])
        mask = enc["attention_mask"].bool()
        base_cpu, steer_cpu = _logits(ref, enc, None), _logits(ref, enc, vec)
        res: dict[str, Any] = {}
        for dt in dict.fromkeys([torch.float32, dtype]):
            lm = copied(ref, device, dt)
            e = {k: v.to(device) for k, v in enc.items()}
            v = ss.SteeringVector({k: vec[k].to(dt) for k in vec.layers})
            before = _logits(lm, e, None)
            steered = _logits(lm, e, v)
            after = _logits(lm, e, None)
            res[str(dt).removeprefix("torch.")] = {
                "steered_logits_rel": float(f"{_rel(steered, steer_cpu, mask):.3g}"),
                "steering_delta_rel": float(f"{_rel(steered - before, steer_cpu - base_cpu, mask):.3g}"),
                "state_restored": bool(torch.equal(before, after)),
                "argmax_agreement": round(float((steered.argmax(-1) == steer_cpu.argmax(-1))[mask].float().mean()), 4),
            }
        out[name] = res
    return out


def circuits_parity(device: str) -> dict[str, Any]:
    """Tiny Llama and Gemma-2 in float32: EAP-IG scores, exact edge and node patching and a circuit's
    patched metric on ``device`` vs the CPU, on one teacher-forced batch (largest relative difference)."""

    from steerscope import circuits as C

    out: dict[str, Any] = {}
    for name, (family, kw) in TINY.items():
        ref = build(family, kw, "cpu", torch.float32, seed=5)
        vec, _ = probe_vector(ref)
        pb = C.prepare(ref, PROMPTS[:3], vec, 1.0, max_new_tokens=6)
        lm = copied(ref, device)
        pbd = C.PatchBatch(**{k: v.to(device) for k, v in pb.tensors().items()})
        res: dict[str, Any] = {"scored_positions": int(pb.mask.sum())}
        a_cpu, a_dev = C.eap_ig(ref, pb, vec, 1.0, steps=4), C.eap_ig(lm, pbd, vec, 1.0, steps=4)
        g = a_cpu.graph
        res["eap_ig_edges_rel"] = float(f"{_rel(a_dev.edges, a_cpu.edges, g.valid):.3g}")
        e_cpu = C.edge_effects(ref, pb, vec, 1.0, g)
        e_dev = C.edge_effects(lm, pbd, vec, 1.0, g)
        res["exact_edges_rel"] = float(f"{_rel(e_dev.cpu(), e_cpu, g.valid):.3g}")
        n_cpu, n_dev = C.node_effects(ref, pb, vec, 1.0, g), C.node_effects(lm, pbd, vec, 1.0, g)
        res["exact_nodes_rel"] = float(f"{_rel(n_dev.cpu(), n_cpu, torch.ones_like(n_cpu, dtype=torch.bool)):.3g}")
        keep = C.greedy_circuit(a_cpu.edges, g, max(1, g.n_edges // 5))
        m_cpu = C.patched_metric(ref, pb, vec, 1.0, g, keep)
        m_dev = C.patched_metric(lm, pbd, vec, 1.0, g, keep.to(device))
        res["circuit_metric_rel"] = float(f"{_rel(m_dev.float().cpu(), m_cpu.float(), torch.ones_like(m_cpu, dtype=torch.bool)):.3g}")
        out[name] = res
    return out


def library_paths(device: str) -> dict[str, Any]:
    """The library's everyday paths on ``device`` vs the CPU, on a tiny Llama in float32: ``extract`` (cosine of
    the two vectors), ``generate`` steered (prompts whose greedy text is identical), ``ablation`` (logits
    change; state restored), ``recording`` (shape) and a quick ``explain`` card (its claims' statuses)."""

    import steerscope as ss
    from steerscope.generation import chat_batch

    family, kw = TINY["tiny-llama"]
    ref = build(family, kw, "cpu", torch.float32, seed=7)
    lm = copied(ref, device)
    pos, neg = PROMPTS[:4], [p.lower().rstrip("?.") + ", please!!" for p in PROMPTS[:4]]
    out: dict[str, Any] = {}

    def part(key: str, fn: Callable[[], Any]) -> None:
        _section(out, key, fn)

    vecs: dict[str, Any] = {}

    def extract() -> dict[str, Any]:
        for name, m in (("cpu", ref), ("device", lm)):
            vecs[name] = ss.extract(m, pos, neg, method="dim", layers=[2], positions=[-1], show_progress=False)
        a, b = vecs["cpu"][2].float().cpu(), vecs["device"][2].float().cpu()
        return {"cosine": round(float(a @ b / (a.norm() * b.norm())), 6), "norm": round(float(b.norm()), 4)}
    part("extract", extract)
    v = vecs.get("cpu")
    if v is None:
        return out
    v = ss.SteeringVector({2: v[2] * (4.0 / float(v[2].norm()))})

    def generate() -> dict[str, Any]:
        a = ss.generate(ref, PROMPTS[:4], vector=v, alpha=1.0, max_new_tokens=8)
        b = ss.generate(lm, PROMPTS[:4], vector=v, alpha=1.0, max_new_tokens=8)
        u = ss.generate(lm, PROMPTS[:4], max_new_tokens=8)
        return {"identical": sum(x == y for x, y in zip(a, b)), "n": len(a), "steering_changed": sum(x != y for x, y in zip(b, u))}
    part("generate", generate)

    def ablation() -> dict[str, Any]:
        enc = chat_batch(lm, PROMPTS[:2])
        with torch.no_grad():
            before = lm.model(**enc).logits
            with ss.ablation(lm, v[2]):
                ablated = lm.model(**enc).logits
            after = lm.model(**enc).logits
        return {"changed": bool((ablated - before).abs().max() > 0), "state_restored": bool(torch.equal(before, after))}
    part("ablation", ablation)

    def recording() -> dict[str, Any]:
        enc = chat_batch(lm, PROMPTS[:2])
        with torch.no_grad(), ss.recording(lm, ["blocks.1.resid_pre"]) as cache:
            lm.model(**enc)
        x = cache["blocks.1.resid_pre"]
        return {"shape": list(x.shape), "device": str(x.device)}
    part("recording", recording)

    def explain() -> dict[str, Any]:
        t0 = time.perf_counter()
        card = ss.explain(lm, v, prompts=PROMPTS[:4], alpha=1.0, quick=True, show_progress=False)
        statuses = [c.status for c in card.claims]
        return {"seconds": round(time.perf_counter() - t0, 1), "claims": len(statuses),
                **{s: statuses.count(s) for s in ("supported", "contradicted", "undecided")}}
    part("explain", explain)
    return out


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float | None:
    if not device.startswith("cuda"):
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t, _ = timed(lambda: [a @ b for _ in range(reps)], device)
    return round(2 * n**3 * reps / t / 1e12, 1)


def _section(res: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """Run one section; a failure is recorded (type and message) and the check goes on."""
    t0 = time.perf_counter()
    try:
        res[key] = fn()
    except Exception as e:  # a check reports every section it can
        traceback.print_exc(file=sys.stderr)
        res[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(f"[gpu_check] {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run_shape(name: str, family: str, kw: dict[str, Any], a: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    res: dict[str, Any] = {"family": family, "config": {k: v for k, v in kw.items() if k != "max_position_embeddings"}}
    t, lm = timed(lambda: build(family, kw, a.device, dtype), a.device)
    res.update(params_b=round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 3), t_build_s=round(t, 1),
               weights_gib=peak_gib(a.device))
    vec, norm = probe_vector(lm)
    res.update(steer_layer=vec.layers[0], resid_norm=round(norm, 3), vector_norm=round(float(vec[vec.layers[0]].norm()), 3))
    _section(res, "generation", lambda: generation(lm, vec, a.device, a.batches, a.tokens, a.rounds))
    _section(res, "eap_ig", lambda: eap_ig(lm, vec, a.device))
    _section(res, "frozen", lambda: frozen(lm, vec, a.device, tokens=min(32, a.tokens)))
    return res  # the model goes with this frame; main frees the device memory before the next shape


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="model dtype")
    ap.add_argument("--tiny", action="store_true", help="tiny configs instead of the 2-3 B shapes (the CPU test)")
    ap.add_argument("--batches", default="1,64", help="generation batch sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation row")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per generation setting")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--sections", default="all", help="comma-separated subset of matmul,parity,circuits,library,shapes")
    a = ap.parse_args(argv)
    a.batches = [int(x) for x in a.batches.split(",")]
    dtype = getattr(torch, a.dtype)
    import transformers

    t_all = time.perf_counter()
    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "dtype": a.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "tiny": a.tiny,
    }
    want = {"matmul", "parity", "circuits", "library", "shapes"} if a.sections == "all" else set(a.sections.split(","))
    if "matmul" in want:
        _section(res, "matmul_tflops", lambda: matmul_tflops(a.device))
    if "parity" in want:
        _section(res, "parity", lambda: parity(a.device, dtype))
    if "circuits" in want:
        _section(res, "circuits_parity", lambda: circuits_parity(a.device))
    if "library" in want:
        _section(res, "library", lambda: library_paths(a.device))
    res["shapes"] = {}
    for name, (family, kw) in ((TINY if a.tiny else SHAPES).items() if "shapes" in want else ()):
        _section(res["shapes"], name, lambda family=family, kw=kw, name=name: run_shape(name, family, kw, a, dtype))
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    res["t_total_s"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
