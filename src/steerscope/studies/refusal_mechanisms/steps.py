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
from steerscope.metrics.judge import PatternJudge
from steerscope.metrics.refusal import asr, is_refusal
from steerscope.models.load import LM
from steerscope.runs import Run, load_tensors, save_tensors
from steerscope.stats import ratio_of_means_ci
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


def heldout_prompts(cfg: Config, setting: str) -> list[str]:
    """The ``n_attr`` test prompts after the attribution prompts: circuits found on the attribution prompts
    are scored on these (held-out faithfulness). Fewer where the split runs out (the record gives n)."""
    start = cfg.eval_offset + cfg.n_eval + cfg.n_attr
    return prompts(setting)[start : start + cfg.n_attr]


def flip_rows(base: Sequence[str], steered: Sequence[str], mask: torch.Tensor) -> tuple[list[int], dict[str, Any]]:
    """Rows kept for patching: those whose refusal judgement the steering flips, when at least 2 flip,
    else every row (the fallback); rows with no scored position are then dropped (all kept if none has
    one: a second fallback). Returns (rows, {n_flipped, fallback_all_prompts, fallback_no_scored}).

    Example:
        >>> flip_rows(["I cannot."] * 3, ["Sure", "I cannot.", "I cannot."], mask)[1]["fallback_all_prompts"]
        True
    """
    flipped = [i for i, (b, s) in enumerate(zip(base, steered)) if is_refusal(b) != is_refusal(s)]
    rows = flipped if len(flipped) >= 2 else list(range(len(base)))
    scored = [i for i in rows if mask[i].any()]
    info = {"n_flipped": len(flipped), "fallback_all_prompts": len(flipped) < 2, "fallback_no_scored": not scored}
    return scored or list(range(len(base))), info


def _filtered_batch(lm: LM, cfg: Config, ps: list[str], vec: SteeringVector, alpha: float
                    ) -> tuple[C.PatchBatch, list[int], dict[str, Any]]:
    """The teacher-forced batch of ``ps`` (all rows), the flip-filtered rows and the filter's record."""
    base = generate(lm, ps, max_new_tokens=cfg.attr_tokens, batch_size=cfg.batch_size)
    pb = C.prepare(lm, ps, vec, alpha, max_new_tokens=cfg.attr_tokens)
    rows, info = flip_rows(base, pb.texts, pb.mask)
    return pb, rows, info


def step_attribution(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str) -> dict[str, Any]:
    """EAP-IG on prompts whose refusal behaviour the steering flips (all prompts if fewer than 2 flip),
    and on the common set (every attribution prompt with a scored position), the same prompts for every
    vector, for the cross-method overlap."""
    alpha = alpha_of(cfg, setting)
    ps = attr_prompts(cfg, setting)
    full, rows, info = _filtered_batch(lm, cfg, ps, vec, alpha)
    pb = full.rows(rows)
    att = C.eap_ig(lm, pb, vec, alpha, steps=cfg.steps, batch_size=4)
    common = [i for i in range(len(ps)) if full.mask[i].any()] or list(range(len(ps)))
    edges_common = att.edges.clone() if common == rows else C.eap_ig(lm, full.rows(common), vec, alpha, steps=cfg.steps,
                                                             batch_size=4).edges
    save_tensors(_tensor_path(run, f"attr_{name}_{setting}"), {
        "edges": att.edges, "nodes": att.nodes, "ie_vec": att.ie_vec, "mean_grad": att.mean_grad, "rows": rows,
        "batch": pb.tensors(), "edges_common": edges_common})
    return {"vector": name, "setting": setting, "alpha": alpha, "n_prompts": len(ps), **info,
            "rows_used": rows, "rows_common": common, "scored_positions": int(pb.mask.sum()), "m_clean": att.m_clean,
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
    (:func:`steerscope.explain.circuit.minimal_circuit`), found on the attribution prompts, then scored
    on held-out prompts (:func:`heldout_prompts`, same flip filter): ``heldout``."""
    att = load_attr(run, name, setting)
    alpha = alpha_of(cfg, setting)
    rec, circ = EC.minimal_circuit(lm, _attr_batch(att), vec, alpha, att["edges"],
                                   cfg.circuit_fracs, cfg.threshold, cfg.bisect_steps)
    save_tensors(_tensor_path(run, f"circuit_{name}_{setting}"), {"circuit": circ})
    return {"vector": name, "setting": setting, **rec,
            "heldout": heldout_faithfulness(lm, cfg, vec, alpha, setting, att["edges"], rec["sizes"], circ)}


def heldout_faithfulness(lm: LM, cfg: Config, vec: SteeringVector, alpha: float, setting: str, edges: torch.Tensor,
                         sizes: Sequence[int], circ: torch.Tensor) -> dict[str, Any]:
    """Faithfulness on the held-out prompts of the grid's circuits and of the minimal one, with a paired
    bootstrap interval over prompts for the minimal one (``n`` prompts; None when the split has none)."""
    ps = heldout_prompts(cfg, setting)
    if not ps:
        return {"n": 0, "note": "no test prompts left after the attribution prompts"}
    full, rows, info = _filtered_batch(lm, cfg, ps, vec, alpha)
    g = _graph(lm, vec)
    circuits = [C.greedy_circuit(edges, g, n) for n in sizes] + [circ]
    m = C.patched_per_prompt(lm, full.rows(rows), vec, alpha, g, circuits).numpy()
    ratio = [float((c.mean() - m[1].mean()) / (m[0].mean() - m[1].mean())) for c in m[2:]]
    point, lo, hi = ratio_of_means_ci(m[-1], m[0], m[1], seed=cfg.seed)
    return {"n": len(rows), "n_prompts": len(ps), **info, "faithfulness": ratio[:-1], "minimal": point,
            "minimal_ci95": [lo, hi], "reached_threshold": bool(point >= cfg.threshold)}


def step_circuit_compare(run: Run, lm: LM, cfg: Config, vecs: dict[str, SteeringVector], setting: str
                         ) -> dict[str, Any]:
    """Overlap of the methods' minimal circuits (each found on its own flip-filtered prompts) and on the
    common prompt set (each method's edges ranked on the same prompts, cut at its minimal size);
    swapped-circuit and 2x random-circuit controls."""
    names = [n for n in vecs if run.done(f"circuits_{n}_{setting}")]
    circs = {n: load_tensors(_tensor_path(run, f"circuit_{n}_{setting}"))["circuit"] for n in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    overlap = {f"{a}-{b}": C.overlap(circs[a], circs[b]) for a, b in pairs}
    common = {n: c for n in names if (c := _common_circuit(run, lm, vecs[n], n, setting)) is not None}
    rows = {n: run.load(f"attribution_{n}_{setting}").get("rows_used") for n in names}
    controls: dict[str, Any] = {}
    for n in names:
        pb = _attr_batch(load_attr(run, n, setting))
        others = [o for o in names if o != n and circs[o].shape == circs[n].shape]
        ctl = EC.controls(lm, pb, vecs[n], alpha_of(cfg, setting), circs[n], cfg.seed, [circs[o] for o in others])
        controls[n] = {"own_size": ctl["own_size"], "random_2x": ctl["random_2x"], "complement": ctl["complement"],
                       "swapped": dict(zip(others, ctl["others"]))}
    return {"setting": setting, "overlap": overlap, "rows_used": rows,
            "overlap_common": {f"{a}-{b}": C.overlap(common[a], common[b]) for a, b in pairs
                               if a in common and b in common},
            "controls": controls}


def _common_circuit(run: Run, lm: LM, vec: SteeringVector, name: str, setting: str) -> torch.Tensor | None:
    """The method's circuit from its common-prompt edge scores, at its minimal circuit's top-n (None for
    runs made before the common set was recorded)."""
    att = load_attr(run, name, setting)
    if "edges_common" not in att:
        return None
    return C.greedy_circuit(att["edges_common"], _graph(lm, vec), run.load(f"circuits_{name}_{setting}")["minimal_top_n"])


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
    judge = PatternJudge()  # beside the paper's matcher: it also catches refusals without a stock phrase
    out["each_judge"] = {m: [int(not x) for x in judge.refusals(ps, t)] for m, t in texts.items()}
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
    """ASR vs sparsity for the matched-k rules (gradient variant r = alpha g, IE, |s|, random) and, beside
    them, paper A's own gradient rule (r = IE_vec / (alpha s) = g on the fixed τ grid): ``paper``."""
    att = load_attr(run, name, setting)
    s, r = vec[vec.layers[0]].float(), att["mean_grad"].float()
    ps, alpha = eval_prompts(cfg, setting), alpha_of(cfg, setting)
    out: dict[str, Any] = {"vector": name, "setting": setting, "sparsities": list(cfg.sparsities),
                           "tau": [S.tau_for(r, sp) for sp in cfg.sparsities], "asr": {}, "keep": {},
                           "headline_rule": "matched-k (r = alpha g, tau = quantile)", "n_eval": len(ps)}
    if evaluate:
        dense = generate(lm, ps, vector=vec, alpha=alpha, max_new_tokens=cfg.eval_tokens, batch_size=cfg.batch_size)
        out["dense_asr"] = asr(dense)
    for method in S.METHODS:
        out["keep"][method] = [S.keep_mask(method, sp, s, r, seed=cfg.seed).nonzero()[:, 0].tolist()
                               for sp in cfg.sparsities]
    if evaluate:  # the card's generation-based sparsity curve, with the ASR as the scorer
        out["asr"] = ES.scored_curve(lm, ps, vec, alpha, r, S.METHODS, cfg.sparsities, _asr_each, cfg.eval_tokens,
                                     cfg.batch_size, cfg.seed, show_progress=True)
    out["paper"] = paper_rule(lm, cfg, vec, alpha, S.paper_ratio(att["ie_vec"], s, alpha), ps if evaluate else [])
    return out


def paper_rule(lm: LM, cfg: Config, vec: SteeringVector, alpha: float, r: torch.Tensor, ps: list[str]
               ) -> dict[str, Any]:
    """Paper A's gradient rule on its τ grid: kept dimensions, the sparsity each τ gives, and (with
    prompts) the ASR with its successes k of n (one generation per distinct kept set)."""
    masks = [S.paper_mask(r, tau) for tau in cfg.paper_taus]
    out: dict[str, Any] = {"taus": list(cfg.paper_taus), "sparsity": [1.0 - float(m.float().mean()) for m in masks],
                           "keep": [m.nonzero()[:, 0].tolist() for m in masks], "r_quantiles": {
                               q: float(r[torch.isfinite(r)].quantile(q)) for q in (0.1, 0.5, 0.9, 0.99)}}
    if not ps:
        return out
    done: dict[tuple[int, ...], int] = {}
    for m in masks:
        key = tuple(m.nonzero()[:, 0].tolist())
        if key not in done:
            texts = generate(lm, ps, vector=S.apply(vec, m), alpha=alpha, max_new_tokens=cfg.eval_tokens,
                             batch_size=cfg.batch_size)
            done[key] = int(sum(_asr_each(texts)))
    out["successes"] = [done[tuple(m.nonzero()[:, 0].tolist())] for m in masks]
    out["n"] = len(ps)
    out["asr"] = [k / len(ps) for k in out["successes"]]
    return out


def _asr_each(texts: Sequence[str]) -> list[float]:
    """1 per completion that is not a refusal (its mean is the ASR)."""
    return [float(not is_refusal(t)) for t in texts]


def _mask(d: int, idx: Sequence[int]) -> torch.Tensor:
    m = torch.zeros(d, dtype=torch.bool)
    m[list(idx)] = True
    return m


def null_ratios(run: Run, lm: LM, cfg: Config, vec: SteeringVector, name: str, setting: str
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(random vector v, alpha * its IG mean gradient) for ``cfg.n_null`` Gaussian vectors with the norm of
    ``vec``, each on ``vec``'s attribution batch (its prompts and its steered / base tokens)."""
    s = vec[vec.layers[0]].float()
    pb = _attr_batch(load_attr(run, name, setting))
    alpha = alpha_of(cfg, setting)
    out = []
    for v in S.random_vectors(s, cfg.n_null, seed=cfg.seed + 7919):
        sv = SteeringVector({vec.layers[0]: v}, site=vec.site)
        out.append((v, C.mean_gradient(lm, pb, sv, alpha, steps=cfg.steps, batch_size=4)))
    return out


def _rule_masks(method: str, j: int, cfg: Config, v: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """Kept set of rule ``method`` at grid point j: the matched-k rules at cfg.sparsities[j], ``paper`` at
    cfg.paper_taus[j] (r = alpha g, so the paper's ratio is r / alpha)."""
    if method == "paper":
        return S.paper_mask(r / alpha, cfg.paper_taus[j])
    return S.keep_mask(method, cfg.sparsities[j], v, r, seed=cfg.seed)


def step_iou(run: Run, lm: LM, cfg: Config, names: list[str], setting: str = "bypass",
             vecs: dict[str, SteeringVector] | None = None) -> dict[str, Any]:
    """IoU of the kept dimensions across vectors, with hypergeometric p-values and (``cfg.n_null`` > 0
    and ``vecs`` given) the random-vector null: B replaced by random vectors of B's norm, scored by the
    same rule on B's attribution batch (``null``)."""
    recs = {n: run.load(f"sparsity_{n}_{setting}") for n in names if run.done(f"sparsity_{n}_{setting}")}
    d, alpha, ns = lm.d_model, alpha_of(cfg, setting), list(recs)
    out: dict[str, Any] = {"setting": setting, "pairs": {}, "null": {}, "n_null": cfg.n_null if vecs else 0}
    draws = {b: null_ratios(run, lm, cfg, vecs[b], b, setting) for b in ns[1:]} if vecs and cfg.n_null else {}
    for method in ("gradient", "ie", "paper"):
        for i, a in enumerate(ns):
            for b in ns[i + 1 :]:
                grid = cfg.paper_taus if method == "paper" else cfg.sparsities
                rows, nulls = [], []
                for j, sp in enumerate(grid):
                    ka, kb = (_keep_of(recs[x], method, j, d) for x in (a, b))
                    if ka is None or kb is None:
                        break
                    rows.append(S.agreement(ka, kb, sp).__dict__)
                    if b in draws:
                        nulls.append(S.null_test(ka, kb, [_rule_masks(method, j, cfg, v, r, alpha)
                                                          for v, r in draws[b]]).__dict__)
                out["pairs"][f"{method}:{a}-{b}"] = rows
                if nulls:
                    out["null"][f"{method}:{a}-{b}"] = nulls
    return out


def _keep_of(rec: dict[str, Any], method: str, j: int, d: int) -> torch.Tensor | None:
    """Kept set j of a sparsity record (None: a record made before the paper rule was added)."""
    if method == "paper":
        return _mask(d, rec["paper"]["keep"][j]) if "paper" in rec else None
    return _mask(d, rec["keep"][method][j])
