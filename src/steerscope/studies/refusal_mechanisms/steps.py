"""Resumable steps of the refusal-mechanisms study: each returns a JSON record; tensors go beside it.

The circuits, circuit controls, Table-1 ablations and sparsity curves are the mechanism card's
sections (:mod:`steerscope.explain`) run on the study's prompt sets with the ASR as the scorer;
what is refusal-specific here is the prompt sets, the flip filter and the tables.

Settings: ``bypass`` = harmful prompts steered with alpha_bypass (< 0), ``induce`` = harmless
prompts steered with alpha_induce (> 0). ASR = fraction of completions that are not refusals.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from scipy.stats import spearmanr

from steerscope import circuits as C
from steerscope.analyses import frozen as F
from steerscope.analyses import ov
from steerscope.analyses import sparsity as S
from steerscope.analyses.lens import logit_lens
from steerscope.data.refusal_prompts import load_split
from steerscope.explain import circuit as EC
from steerscope.explain import frozen as EF
from steerscope.explain import sparsity as ES
from steerscope.generation import generate
from steerscope.metrics.refusal import asr, is_refusal
from steerscope.models.load import LM
from steerscope.runs import Run, load_tensors, save_tensors
from steerscope.studies.refusal_mechanisms.config import Config
from steerscope.vector import SteeringVector

SETTINGS = ("bypass", "induce")


def prompts(kind: str) -> list[str]:
    """The shipped TEST split (harmful for bypass, harmless for induce): never seen by the organism's
    fine-tune or by the vectors' extraction and training (train split)."""
    return load_split("harmful" if kind == "bypass" else "harmless", "test")


def alpha_of(cfg: Config, setting: str) -> float:
    return cfg.alpha_bypass if setting == "bypass" else cfg.alpha_induce


def eval_prompts(cfg: Config, setting: str) -> list[str]:
    return prompts(setting)[cfg.eval_offset : cfg.eval_offset + cfg.n_eval]


def ablation_prompts(cfg: Config, setting: str) -> list[str]:
    """The Table-1 prompts: the first ``n_ablate`` of the test split (``n_eval`` when 0). They may overlap
    the attribution prompts, which the ablations do not use."""
    return prompts(setting)[cfg.eval_offset : cfg.eval_offset + (cfg.n_ablate or cfg.n_eval)]


def attr_prompts(cfg: Config, setting: str) -> list[str]:
    start = cfg.eval_offset + cfg.n_eval
    return prompts(setting)[start : start + cfg.n_attr]


def _tensor_path(run: Run, name: str) -> str:
    return str(run.path("tensors", f"{name}.safetensors"))


def step_attribution(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str) -> dict[str, Any]:
    """EAP-IG on prompts whose refusal behaviour the steering flips (all prompts if fewer than 2 flip)."""
    alpha = alpha_of(cfg, setting)
    ps = attr_prompts(cfg, setting)
    base = generate(lm, ps, max_new_tokens=cfg.attr_tokens, batch_size=cfg.batch_size)
    pb = C.prepare(lm, ps, vec, alpha, max_new_tokens=cfg.attr_tokens)
    flipped = [i for i, (b, s) in enumerate(zip(base, pb.texts)) if is_refusal(b) != is_refusal(s)]
    rows = flipped if len(flipped) >= 2 else list(range(len(ps)))
    rows = [i for i in rows if pb.mask[i].any()] or list(range(len(ps)))
    pb = pb.rows(rows)
    att = C.eap_ig(lm, pb, vec, alpha, steps=cfg.steps, batch_size=4)
    save_tensors(_tensor_path(run, f"attr_{name}_{setting}"), {
        "edges": att.edges, "nodes": att.nodes, "ie_vec": att.ie_vec, "mean_grad": att.mean_grad, "rows": rows,
        "batch": pb.tensors()})
    return {"vector": name, "setting": setting, "alpha": alpha, "n_prompts": len(ps), "n_flipped": len(flipped),
            "rows_used": rows, "scored_positions": int(pb.mask.sum()), "m_clean": att.m_clean,
            "m_corrupt": att.m_corrupt, "s_node": float(att.nodes[0]), "n_edges": att.graph.n_edges,
            "n_nodes": len(att.graph.upstream),
            "top_nodes": [{"node": n.to_dict(), "score": v} for n, v in att.top_nodes(15)],
            "steered_texts": [pb.texts[i] for i in range(len(pb.texts))][:4]}


def load_attr(run: Run, name: str, setting: str) -> dict[str, Any]:
    return load_tensors(_tensor_path(run, f"attr_{name}_{setting}"))


def step_exact_check(run: Run, lm: LM, cfg: Config, vec: SteeringVector, setting: str = "bypass") -> dict[str, Any]:
    """EAP-IG node scores vs exact activation patching (one forward per node) on the real model."""
    import time

    alpha = alpha_of(cfg, setting)
    ps = attr_prompts(cfg, setting)[: cfg.n_check]
    pb = C.prepare(lm, ps, vec, alpha, max_new_tokens=min(cfg.attr_tokens, 16))
    t0 = time.perf_counter()
    att = C.eap_ig(lm, pb, vec, alpha, steps=cfg.steps, batch_size=cfg.n_check)
    t_eap = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = C.node_patching(lm, pb, vec, alpha, att.graph)
    t_exact = time.perf_counter() - t0
    out: dict[str, Any] = {"setting": setting, "n_prompts": len(ps), "scored_positions": int(pb.mask.sum()),
                           "t_eapig_s": round(t_eap, 2), "t_exact_nodes_s": round(t_exact, 2),
                           "time_ratio_nodes": round(t_exact / t_eap, 2),
                           "s_node_eap": float(att.nodes[0]), "s_node_exact": float(exact[0])}
    for k in (10, 20, 50):
        top = exact.abs().argsort(descending=True)[:k]
        out[f"spearman_top{k}"] = round(float(spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic), 3)
    out["spearman_all"] = round(float(spearmanr(exact.numpy(), att.nodes.numpy()).statistic), 3)
    return out


def _graph(lm: LM, vec: SteeringVector) -> C.Graph:
    return C.model_graph(lm, vec.layers[0])


def _attr_batch(att: dict[str, Any]) -> C.PatchBatch:
    """The teacher-forced batch the attribution step used (stored beside its scores)."""
    return C.PatchBatch(**att["batch"])


def step_circuits(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str) -> dict[str, Any]:
    """Faithfulness vs circuit size (exact edge-level patching); the minimal faithful circuit
    (:func:`steerscope.explain.circuit.minimal_circuit`)."""
    att = load_attr(run, name, setting)
    rec, circ = EC.minimal_circuit(lm, _attr_batch(att), vec, alpha_of(cfg, setting), att["edges"],
                                   cfg.circuit_fracs, cfg.threshold, cfg.bisect_steps)
    save_tensors(_tensor_path(run, f"circuit_{name}_{setting}"), {"circuit": circ})
    return {"vector": name, "setting": setting, **rec}


def step_circuit_compare(run: Run, lm: LM, cfg: Config, vecs: dict[str, SteeringVector], setting: str
                         ) -> dict[str, Any]:
    """Overlap of the methods' minimal circuits; swapped-circuit and 2x random-circuit controls."""
    names = [n for n in vecs if run.done(f"circuits_{n}_{setting}")]
    circs = {n: load_tensors(_tensor_path(run, f"circuit_{n}_{setting}"))["circuit"] for n in names}
    overlap = {f"{a}-{b}": C.overlap(circs[a], circs[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    controls: dict[str, Any] = {}
    for n in names:
        pb = _attr_batch(load_attr(run, n, setting))
        others = [o for o in names if o != n and circs[o].shape == circs[n].shape]
        ctl = EC.controls(lm, pb, vecs[n], alpha_of(cfg, setting), circs[n], cfg.seed, [circs[o] for o in others])
        controls[n] = {"own_size": ctl["own_size"], "random_2x": ctl["random_2x"], "complement": ctl["complement"],
                       "swapped": dict(zip(others, ctl["others"]))}
    return {"setting": setting, "overlap": overlap, "controls": controls}


def step_ablations(run: Run, lm: LM, cfg: Config, vec: SteeringVector, setting: str) -> dict[str, Any]:
    """ASR unsteered, steered, and steered with QK frozen / OV frozen / svv removed / MLP ablated
    (the generations of the card's ``frozen`` section, :func:`steerscope.explain.frozen.generations`)."""
    ps, alpha = ablation_prompts(cfg, setting), alpha_of(cfg, setting)
    ids = EF.generations(lm, ps, vec, alpha, ("unsteered", *F.MODES), cfg.eval_tokens, cfg.batch_size,
                         show_progress=True)
    texts = {m: lm.tokenizer.batch_decode(t, skip_special_tokens=True) for m, t in ids.items()}
    out: dict[str, Any] = {"setting": setting, "alpha": alpha, "n": len(ps)}
    out.update({m: asr(t) for m, t in texts.items()})
    out["each"] = {m: [int(x) for x in _asr_each(t)] for m, t in texts.items()}  # per prompt: paired tests
    out["samples"] = {m: t[:3] for m, t in texts.items()}
    return out


def step_svv(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str = "bypass",
             n_heads: int = 8, k: int = 12) -> dict[str, Any]:
    """Logit lens of the svvs of the top heads by EAP-IG node score (and of s itself)."""
    att = load_attr(run, name, setting)
    g = _graph(lm, vec)
    scores = {g.upstream[i]: float(att["nodes"][i]) for i in range(len(g.upstream))}
    s = vec[vec.layers[0]] * alpha_of(cfg, setting)
    rows = ov.lens_table(lm, s, scores, n_heads=n_heads, k=k)
    top = logit_lens(lm, s, k, final_norm=True)[0]
    bottom = logit_lens(lm, s, k, final_norm=True, largest=False)[0]
    return {"vector": name, "setting": setting, "heads": [r.to_dict() for r in rows],
            "raw_vector": {"top": top.tokens, "bottom": bottom.tokens}}


def step_sparsity(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str = "bypass",
                  evaluate: bool = True) -> dict[str, Any]:
    """ASR vs sparsity for the gradient, IE, |s| and random rules (k matched)."""
    att = load_attr(run, name, setting)
    s, r = vec[vec.layers[0]].float(), att["mean_grad"].float()
    ps, alpha = eval_prompts(cfg, setting), alpha_of(cfg, setting)
    out: dict[str, Any] = {"vector": name, "setting": setting, "sparsities": list(cfg.sparsities),
                           "tau": [S.tau_for(r, sp) for sp in cfg.sparsities], "asr": {}, "keep": {}}
    if evaluate:
        dense = generate(lm, ps, vector=vec, alpha=alpha, max_new_tokens=cfg.eval_tokens, batch_size=cfg.batch_size)
        out["dense_asr"] = asr(dense)
    for method in S.METHODS:
        out["keep"][method] = [S.keep_mask(method, sp, s, r, seed=cfg.seed).nonzero()[:, 0].tolist()
                               for sp in cfg.sparsities]
    if evaluate:  # the card's generation-based sparsity curve, with the ASR as the scorer
        out["asr"] = ES.scored_curve(lm, ps, vec, alpha, r, S.METHODS, cfg.sparsities, _asr_each, cfg.eval_tokens,
                                     cfg.batch_size, cfg.seed, show_progress=True)
    return out


def _asr_each(texts: Sequence[str]) -> list[float]:
    """1 per completion that is not a refusal (its mean is the ASR)."""
    return [float(not is_refusal(t)) for t in texts]


def step_iou(run: Run, lm: LM, cfg: Config, names: list[str], setting: str = "bypass") -> dict[str, Any]:
    """IoU of the kept dimensions across vectors, with hypergeometric p-values."""
    recs = {n: run.load(f"sparsity_{n}_{setting}") for n in names if run.done(f"sparsity_{n}_{setting}")}
    d = lm.d_model
    out: dict[str, Any] = {"setting": setting, "pairs": {}}
    ns = list(recs)
    for method in ("gradient", "ie"):
        for i, a in enumerate(ns):
            for b in ns[i + 1 :]:
                rows = []
                for j, sp in enumerate(cfg.sparsities):
                    ka, kb = torch.zeros(d, dtype=torch.bool), torch.zeros(d, dtype=torch.bool)
                    ka[recs[a]["keep"][method][j]] = True
                    kb[recs[b]["keep"][method][j]] = True
                    rows.append(S.agreement(ka, kb, sp).__dict__)
                out["pairs"][f"{method}:{a}-{b}"] = rows
    return out
