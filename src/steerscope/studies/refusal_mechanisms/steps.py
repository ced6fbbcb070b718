"""Resumable steps of the refusal-mechanisms study: each returns a typed record
(:mod:`steerscope.studies.refusal_mechanisms.records`); tensors go beside it.

The circuits, circuit controls, Table-1 ablations and sparsity curves are the mechanism card's
sections (:mod:`steerscope.explain`) run on the study's prompt sets with the ASR as the scorer;
what is refusal-specific here is the prompt sets, the flip filter and the tables.

Settings: ``bypass`` = harmful prompts steered with alpha_bypass (< 0), ``induce`` = harmless
prompts steered with alpha_induce (> 0). ASR = fraction of completions that are not refusals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

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
from steerscope.studies.refusal_mechanisms import records as rc
from steerscope.studies.refusal_mechanisms.config import Config
from steerscope.studies.refusal_mechanisms.records import SETTINGS
from steerscope.vector import SteeringVector

__all__ = ["SETTINGS", "AttrTensors", "flip_rows", "step_ablations", "step_attribution", "step_circuit_compare",
           "step_circuits", "step_exact_check", "step_iou", "step_sparsity", "step_svv"]


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


def flip_rows(base: Sequence[str], steered: Sequence[str], mask: torch.Tensor) -> tuple[list[int], rc.FlipFilter]:
    """Rows kept for patching: those whose refusal judgement the steering flips, when at least 2 flip,
    else every row (the fallback); rows with no scored position are then dropped (all kept if none has
    one: a second fallback). Returns (rows, the filter's record).

    Example:
        >>> flip_rows(["I cannot."] * 3, ["Sure", "I cannot.", "I cannot."], mask)[1].fallback_all_prompts
        True
    """
    flipped = [i for i, (b, s) in enumerate(zip(base, steered)) if is_refusal(b) != is_refusal(s)]
    rows = flipped if len(flipped) >= 2 else list(range(len(base)))
    scored = [i for i in rows if mask[i].any()]
    info = rc.FlipFilter(len(flipped), len(flipped) < 2, not scored)
    return scored or list(range(len(base))), info


def _filtered_batch(lm: LM, cfg: Config, ps: list[str], vec: SteeringVector, alpha: float
                    ) -> tuple[C.PatchBatch, list[int], rc.FlipFilter]:
    """The teacher-forced batch of ``ps`` (all rows), the flip-filtered rows and the filter's record."""
    base = generate(lm, ps, max_new_tokens=cfg.attr_tokens, batch_size=cfg.batch_size)
    pb = C.prepare(lm, ps, vec, alpha, max_new_tokens=cfg.attr_tokens)
    rows, info = flip_rows(base, pb.texts, pb.mask)
    return pb, rows, info


def step_attribution(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str
                     ) -> rc.AttributionRecord:
    """EAP-IG on prompts whose refusal behaviour the steering flips (all prompts if fewer than 2 flip),
    and on the common set (every attribution prompt with a scored position), the same prompts for every
    vector, for the cross-method overlap.

    Example:
        >>> step_attribution(run, lm, Config(), "dim", vec, "bypass").n_flipped
    """
    alpha = alpha_of(cfg, setting)
    ps = attr_prompts(cfg, setting)
    full, rows, info = _filtered_batch(lm, cfg, ps, vec, alpha)
    pb = full.rows(rows)
    att = C.eap_ig(lm, pb, vec, alpha, steps=cfg.steps, batch_size=4)
    common = [i for i in range(len(ps)) if full.mask[i].any()] or list(range(len(ps)))
    edges_common = att.edges.clone() if common == rows else C.eap_ig(lm, full.rows(common), vec, alpha, steps=cfg.steps,
                                                             batch_size=4).edges
    save_tensors(_tensor_path(run, rc.attr_tensors(name, setting)), {
        "edges": att.edges, "nodes": att.nodes, "ie_vec": att.ie_vec, "mean_grad": att.mean_grad, "rows": rows,
        "batch": pb.tensors(), "edges_common": edges_common})
    return rc.AttributionRecord(
        vector=name, setting=setting, alpha=alpha, n_prompts=len(ps), n_flipped=info.n_flipped,
        fallback_all_prompts=info.fallback_all_prompts, fallback_no_scored=info.fallback_no_scored, rows_used=rows,
        rows_common=common, scored_positions=int(pb.mask.sum()), m_clean=att.m_clean, m_corrupt=att.m_corrupt,
        s_node=float(att.nodes[0]), n_edges=att.graph.n_edges, n_nodes=len(att.graph.upstream),
        top_nodes=[rc.TopNode(n.to_dict(), v) for n, v in att.top_nodes(15)],
        steered_texts=[pb.texts[i] for i in range(len(pb.texts))][:4])


@dataclass(frozen=True)
class AttrTensors:
    """The tensors an attribution step stores beside its record: edge and node scores, the IG mean gradient,
    the rows used, the teacher-forced batch and the common-set edge scores (None for older runs)."""

    edges: torch.Tensor
    nodes: torch.Tensor
    ie_vec: torch.Tensor
    mean_grad: torch.Tensor
    batch: dict[str, torch.Tensor]  # :meth:`PatchBatch.tensors`
    edges_common: torch.Tensor | None = None


def load_attr(run: Run, name: str, setting: str) -> AttrTensors:
    """The stored tensors of step ``attribution_<name>_<setting>``.

    Example:
        >>> load_attr(run, "dim", "bypass").mean_grad.shape
    """
    t = load_tensors(_tensor_path(run, rc.attr_tensors(name, setting)))
    return AttrTensors(t["edges"], t["nodes"], t["ie_vec"], t["mean_grad"], t["batch"], t.get("edges_common"))


def step_exact_check(run: Run, lm: LM, cfg: Config, vec: SteeringVector, setting: str = "bypass"
                     ) -> rc.ExactCheckRecord:
    """EAP-IG node scores vs exact activation patching (one forward per node) on the real model.

    Example:
        >>> step_exact_check(run, lm, Config(), vec).spearman_all
    """
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
    rho = {}
    for k in (10, 20, 50):
        top = exact.abs().argsort(descending=True)[:k]
        rho[k] = round(float(spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic), 3)
    return rc.ExactCheckRecord(setting, len(ps), int(pb.mask.sum()), round(t_eap, 2), round(t_exact, 2),
                               round(t_exact / t_eap, 2), float(att.nodes[0]), float(exact[0]), rho[10], rho[20],
                               rho[50], round(float(spearmanr(exact.numpy(), att.nodes.numpy()).statistic), 3))


def _graph(lm: LM, vec: SteeringVector) -> C.Graph:
    return C.model_graph(lm, vec.layers[0])


def _attr_batch(att: AttrTensors) -> C.PatchBatch:
    """The teacher-forced batch the attribution step used (stored beside its scores)."""
    b = att.batch
    return C.PatchBatch(b["ids"], b["attn"], b["pos_ids"], b["y_steer"], b["y_base"], b["mask"])


def step_circuits(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str) -> rc.CircuitsRecord:
    """Faithfulness vs circuit size (exact edge-level patching); the minimal faithful circuit
    (:func:`steerscope.explain.circuit.minimal_circuit`), found on the attribution prompts, then scored
    on held-out prompts (:func:`heldout_prompts`, same flip filter): ``heldout``.

    Example:
        >>> step_circuits(run, lm, Config(), "dim", vec, "bypass").minimal_edges
    """
    att = load_attr(run, name, setting)
    alpha = alpha_of(cfg, setting)
    rec, circ = EC.minimal_circuit(lm, _attr_batch(att), vec, alpha, att.edges,
                                   cfg.circuit_fracs, cfg.threshold, cfg.bisect_steps)
    save_tensors(_tensor_path(run, rc.circuit_tensors(name, setting)), {"circuit": circ})
    return rc.CircuitsRecord(vector=name, setting=setting, **rec.fields(),
                             heldout=heldout_faithfulness(lm, cfg, vec, alpha, setting, att.edges, rec.sizes, circ))


def heldout_faithfulness(lm: LM, cfg: Config, vec: SteeringVector, alpha: float, setting: str, edges: torch.Tensor,
                         sizes: Sequence[int], circ: torch.Tensor) -> rc.Heldout:
    """Faithfulness on the held-out prompts of the grid's circuits and of the minimal one, with a paired
    bootstrap interval over prompts for the minimal one (``n`` prompts; None when the split has none).

    Example:
        >>> heldout_faithfulness(lm, cfg, vec, -1.0, "bypass", att.edges, [1, 3], circ).minimal_ci95
    """
    ps = heldout_prompts(cfg, setting)
    if not ps:
        return rc.Heldout(n=0, note="no test prompts left after the attribution prompts")
    full, rows, info = _filtered_batch(lm, cfg, ps, vec, alpha)
    g = _graph(lm, vec)
    circuits = [C.greedy_circuit(edges, g, n) for n in sizes] + [circ]
    m = C.patched_per_prompt(lm, full.rows(rows), vec, alpha, g, circuits).numpy()
    ratio = [float((c.mean() - m[1].mean()) / (m[0].mean() - m[1].mean())) for c in m[2:]]
    point, lo, hi = ratio_of_means_ci(m[-1], m[0], m[1], seed=cfg.seed)
    return rc.Heldout(n=len(rows), n_prompts=len(ps), n_flipped=info.n_flipped,
                      fallback_all_prompts=info.fallback_all_prompts, fallback_no_scored=info.fallback_no_scored,
                      faithfulness=ratio[:-1], minimal=point, minimal_ci95=[lo, hi],
                      reached_threshold=bool(point >= cfg.threshold))


def step_circuit_compare(run: Run, lm: LM, cfg: Config, vecs: dict[str, SteeringVector], setting: str
                         ) -> rc.CircuitCompareRecord:
    """Overlap of the methods' minimal circuits (each found on its own flip-filtered prompts) and on the
    common prompt set (each method's edges ranked on the same prompts, cut at its minimal size);
    swapped-circuit and 2x random-circuit controls.

    Example:
        >>> step_circuit_compare(run, lm, Config(), vecs, "bypass").overlap["dim-po"]
    """
    names = [n for n in vecs if run.done(rc.circuits_step(n, setting))]
    circs = {n: load_tensors(_tensor_path(run, rc.circuit_tensors(n, setting)))["circuit"] for n in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    overlap = {f"{a}-{b}": C.overlap(circs[a], circs[b]) for a, b in pairs}
    common = {n: c for n in names if (c := _common_circuit(run, lm, vecs[n], n, setting)) is not None}
    rows: dict[str, list[int] | None] = {n: run.load_record(rc.attribution_step(n, setting), rc.AttributionRecord).rows_used for n in names}
    controls = {}
    for n in names:
        pb = _attr_batch(load_attr(run, n, setting))
        others = [o for o in names if o != n and circs[o].shape == circs[n].shape]
        ctl = EC.controls(lm, pb, vecs[n], alpha_of(cfg, setting), circs[n], cfg.seed, [circs[o] for o in others])
        controls[n] = rc.Controls(ctl.own_size, ctl.random_2x, ctl.complement, dict(zip(others, ctl.others)))
    return rc.CircuitCompareRecord(setting=setting, overlap=overlap, rows_used=rows, overlap_common={
        f"{a}-{b}": C.overlap(common[a], common[b]) for a, b in pairs if a in common and b in common}, controls=controls)


def _common_circuit(run: Run, lm: LM, vec: SteeringVector, name: str, setting: str) -> torch.Tensor | None:
    """The method's circuit from its common-prompt edge scores, at its minimal circuit's top-n (None for
    runs made before the common set was recorded)."""
    att = load_attr(run, name, setting)
    if att.edges_common is None:
        return None
    top_n = run.load_record(rc.circuits_step(name, setting), rc.CircuitsRecord).minimal_top_n
    return C.greedy_circuit(att.edges_common, _graph(lm, vec), top_n)


def step_ablations(run: Run, lm: LM, cfg: Config, vec: SteeringVector, setting: str) -> rc.AblationsRecord:
    """ASR unsteered, steered, and steered with QK frozen / OV frozen / svv removed / MLP ablated
    (the generations of the card's ``frozen`` section, :func:`steerscope.explain.frozen.generations`).

    Example:
        >>> step_ablations(run, lm, Config(), vec, "bypass").ov
    """
    ps, alpha = ablation_prompts(cfg, setting), alpha_of(cfg, setting)
    ids = EF.generations(lm, ps, vec, alpha, ("unsteered", *F.MODES), cfg.eval_tokens, cfg.batch_size,
                         show_progress=True)
    texts = {m: lm.tokenizer.batch_decode(t, skip_special_tokens=True) for m, t in ids.items()}
    judge = PatternJudge()  # beside the paper's matcher: it also catches refusals without a stock phrase
    return rc.AblationsRecord(
        setting=setting, alpha=alpha, n=len(ps), **{m: asr(texts[m]) for m in rc.ABLATION_MODES},
        each={m: [int(x) for x in _asr_each(t)] for m, t in texts.items()},  # per prompt: paired tests
        each_judge={m: [int(not x) for x in judge.refusals(ps, t)] for m, t in texts.items()},
        samples={m: t[:3] for m, t in texts.items()})


def step_svv(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str = "bypass",
             n_heads: int = 8, k: int = 12) -> rc.SvvRecord:
    """Logit lens of the svvs of the top heads by EAP-IG node score (and of s itself).

    Example:
        >>> step_svv(run, lm, Config(), "dim", vec).raw_vector.top
    """
    att = load_attr(run, name, setting)
    g = _graph(lm, vec)
    scores = {g.upstream[i]: float(att.nodes[i]) for i in range(len(g.upstream))}
    s = vec[vec.layers[0]] * alpha_of(cfg, setting)
    rows = ov.lens_table(lm, s, scores, n_heads=n_heads, k=k)
    top = logit_lens(lm, s, k, final_norm=True)[0]
    bottom = logit_lens(lm, s, k, final_norm=True, largest=False)[0]
    return rc.SvvRecord(name, setting, [rc.LensHead.from_dict(r.to_dict()) for r in rows],
                        rc.RawLens(top.tokens, bottom.tokens))


def step_sparsity(run: Run, lm: LM, cfg: Config, name: str, vec: SteeringVector, setting: str = "bypass",
                  evaluate: bool = True) -> rc.SparsityRecord:
    """ASR vs sparsity for the matched-k rules (gradient variant r = alpha g, IE, |s|, random) and, beside
    them, paper A's own gradient rule (r = IE_vec / (alpha s) = g on the fixed τ grid): ``paper``.

    Example:
        >>> step_sparsity(run, lm, Config(), "dim", vec).asr["gradient"]
    """
    att = load_attr(run, name, setting)
    s, r = vec[vec.layers[0]].float(), att.mean_grad.float()
    ps, alpha = eval_prompts(cfg, setting), alpha_of(cfg, setting)
    dense_asr, curve = None, {}
    if evaluate:
        dense = generate(lm, ps, vector=vec, alpha=alpha, max_new_tokens=cfg.eval_tokens, batch_size=cfg.batch_size)
        dense_asr = asr(dense)
    keep = {method: [S.keep_mask(method, sp, s, r, seed=cfg.seed).nonzero()[:, 0].tolist() for sp in cfg.sparsities]
            for method in S.METHODS}
    if evaluate:  # the card's generation-based sparsity curve, with the ASR as the scorer
        curve = ES.scored_curve(lm, ps, vec, alpha, r, S.METHODS, cfg.sparsities, _asr_each, cfg.eval_tokens,
                                cfg.batch_size, cfg.seed, show_progress=True)
    return rc.SparsityRecord(
        vector=name, setting=setting, sparsities=list(cfg.sparsities),
        tau=[S.tau_for(r, sp) for sp in cfg.sparsities], asr=curve, keep=keep,
        headline_rule="matched-k (r = alpha g, tau = quantile)", n_eval=len(ps), dense_asr=dense_asr,
        paper=paper_rule(lm, cfg, vec, alpha, S.paper_ratio(att.ie_vec, s, alpha), ps if evaluate else []))


def paper_rule(lm: LM, cfg: Config, vec: SteeringVector, alpha: float, r: torch.Tensor, ps: list[str]
               ) -> rc.PaperRule:
    """Paper A's gradient rule on its τ grid: kept dimensions, the sparsity each τ gives, and (with
    prompts) the ASR with its successes k of n (one generation per distinct kept set).

    Example:
        >>> paper_rule(lm, Config(), vec, -1.0, S.paper_ratio(ie_vec, s, -1.0), []).sparsity
    """
    masks = [S.paper_mask(r, tau) for tau in cfg.paper_taus]
    rule = rc.PaperRule(taus=list(cfg.paper_taus), sparsity=[1.0 - float(m.float().mean()) for m in masks],
                        keep=[m.nonzero()[:, 0].tolist() for m in masks],
                        r_quantiles={str(q): float(r[torch.isfinite(r)].quantile(q)) for q in (0.1, 0.5, 0.9, 0.99)})
    if not ps:
        return rule
    done: dict[tuple[int, ...], int] = {}
    for m in masks:
        key = tuple(m.nonzero()[:, 0].tolist())
        if key not in done:
            texts = generate(lm, ps, vector=S.apply(vec, m), alpha=alpha, max_new_tokens=cfg.eval_tokens,
                             batch_size=cfg.batch_size)
            done[key] = int(sum(_asr_each(texts)))
    successes = [done[tuple(m.nonzero()[:, 0].tolist())] for m in masks]
    return replace(rule, successes=successes, n=len(ps), asr=[k / len(ps) for k in successes])


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
             vecs: dict[str, SteeringVector] | None = None) -> rc.IouRecord:
    """IoU of the kept dimensions across vectors, with hypergeometric p-values and (``cfg.n_null`` > 0
    and ``vecs`` given) the random-vector null: B replaced by random vectors of B's norm, scored by the
    same rule on B's attribution batch (``null``).

    Example:
        >>> step_iou(run, lm, Config(), ["dim", "po"], vecs=vecs).pairs["ie:dim-po"][0].iou
    """
    recs = {n: run.load_record(rc.sparsity_step(n, setting), rc.SparsityRecord) for n in names
            if run.done(rc.sparsity_step(n, setting))}
    d, alpha, ns = lm.d_model, alpha_of(cfg, setting), list(recs)
    pairs: dict[str, list[rc.AgreementRow]] = {}
    null: dict[str, list[rc.NullRow]] = {}
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
                    rows.append(rc.AgreementRow(**asdict(S.agreement(ka, kb, sp))))
                    if b in draws:
                        nulls.append(rc.NullRow(**asdict(S.null_test(ka, kb, [_rule_masks(method, j, cfg, v, r, alpha)
                                                                             for v, r in draws[b]]))))
                pairs[f"{method}:{a}-{b}"] = rows
                if nulls:
                    null[f"{method}:{a}-{b}"] = nulls
    return rc.IouRecord(setting, pairs, null, cfg.n_null if vecs else 0)


def _keep_of(rec: rc.SparsityRecord, method: str, j: int, d: int) -> torch.Tensor | None:
    """Kept set j of a sparsity record (None: a record made before the paper rule was added)."""
    if method == "paper":
        return _mask(d, rec.paper.keep[j]) if rec.paper is not None else None
    return _mask(d, rec.keep[method][j])
