"""The identifiability study's steps: one function per resumable step, each returning a typed record
(:mod:`steerscope.studies.identifiability.records`).

Steps: ``vectors`` (DIM/PCA per trait), ``scorers`` (validate classifiers), ``gen_*`` (sampled
generations per trait/method/seed, all conditions batched in one generate call), ``scores``,
``effects`` (Cohen's d, CIs, correlation, JSD), ``logits`` (next-token agreement, k-subspaces),
``nullspace`` (activation covariance and logit-Jacobian spectra, finite-difference check).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

import steerscope as ss
from steerscope.analyses import identifiability as idf
from steerscope.data import data_path, neutral_prompts, read_jsonl
from steerscope.extract import METHODS
from steerscope.metrics.classifiers import Embedder, Scorer, best_scorer, build_scorers
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.runs import Run
from steerscope.stats import mean_ci
from steerscope.studies.identifiability.config import PCA_PAPER, Config
from steerscope.studies.identifiability.records import (
    Agreement,
    EffectRow,
    EffectsRecord,
    FdCheck,
    Generations,
    JRatio,
    LogitsRecord,
    NullspaceRecord,
    ScorerCheck,
    ScorersRecord,
    Scores,
    SubspaceRow,
    VectorsRecord,
    Verdict,
)
from steerscope.vector import dataset_hash

CONDITIONS = ("v", "v+v_perp", "v_perp")
PAPER_PROBES = 1000  # paper C's random unit probes of the Jacobian (its (probes - rank) / probes)
MIN_N = 10  # scores per condition (seeds pooled) below which no interval-based verdict is given


def layer_of(cfg: Config, lm: LM) -> int:
    """Extraction layer (default n_layers // 2); injection is at layer + offset."""
    layer = cfg.layer if cfg.layer is not None else lm.n_layers // 2
    if not (0 <= layer and layer + cfg.offset < lm.n_layers):
        raise ss.SteerscopeError(f"--layer {layer} with --offset {cfg.offset} is outside 0..{lm.n_layers - 1}")
    return layer


def shift_prompts(n: int | None = None) -> list[dict[str, str]]:
    """Shift prompts (topic / genre / safety); ``n`` of them taken with an even stride over the file."""
    rows = read_jsonl(data_path("traits", "shift_prompts.jsonl"))
    if n is None or n >= len(rows):
        return rows
    return rows[::-(-len(rows) // n)][:n]


# -- vectors ------------------------------------------------------------------------------------
def vectors(run: Run, lm: LM, cfg: Config) -> VectorsRecord:
    """Extract DIM and PCA vectors per trait at the layer; save them; norms and cosines."""
    layer = layer_of(cfg, lm)
    norms: dict[str, float] = {}
    files: dict[str, str] = {}
    cos_methods: dict[str, float] = {}
    vecs: dict[tuple[str, str], torch.Tensor] = {}
    for trait in cfg.traits:
        pairs = read_jsonl(data_path("traits", f"{trait}.jsonl"))
        pos, neg = [p["positive"] for p in pairs], [p["negative"] for p in pairs]
        # one activation pass serves both methods (what ss.extract does, without running it twice)
        acts = ss.collect(lm, [lm.format_chat(p) for p in pos + neg], [layer], positions=[-1])[layer]
        cos_methods.update(method_cosines(trait, acts[:len(pos)], acts[len(pos):]))
        methods: tuple[str, ...] = ("dim", "pca", *(m for m in PCA_PAPER if m in cfg.methods))
        for method in methods:
            prov = ss.Provenance.for_model(lm, method=method, positions=[-1], n_examples=len(pos) + len(neg),
                                           dataset_hash=dataset_hash(pos + ["|"] + neg),
                                           args={"site": "resid_pre", "trait": trait, "study": "identifiability"})
            d = METHODS[method.removesuffix("_flipped")](acts[:len(pos)], acts[len(pos):])
            if method in PCA_PAPER:  # the paper's unit vector, rescaled to |DIM|: the pair differs in direction only
                d = d * vecs[(trait, "dim")].norm() * (-1 if method == "pca_paper_flipped" else 1)
            v = ss.SteeringVector({layer: d}, "resid_pre", prov)
            path = run.path("vectors", f"{trait}_{method}.safetensors")
            v.save(path)
            vecs[(trait, method)] = v[layer]
            files[f"{trait}_{method}"] = str(path)
            norms[f"{trait}_{method}"] = float(v[layer].norm())
    cos_dim_pca = {t: float(torch.cosine_similarity(vecs[(t, "dim")], vecs[(t, "pca")], 0)) for t in cfg.traits}
    cos_traits = {f"{a}~{b}": float(torch.cosine_similarity(vecs[(a, "dim")], vecs[(b, "dim")], 0))
                  for i, a in enumerate(cfg.traits) for b in cfg.traits[i + 1:]}
    return VectorsRecord(layer, layer + cfg.offset, norms, files, cos_dim_pca, cos_traits, cos_methods)


COSINE_METHODS = ("caa", "pca_diff", "pca_center", "pca_paper", "probe")  # extraction choices compared with DIM


def method_cosines(trait: str, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
    """{"trait|method": cos(DIM, method)} for the contrast methods of :data:`COSINE_METHODS` on one set of
    activations (pos, neg [pairs d_model])."""
    dim = METHODS["dim"](pos, neg)
    return {f"{trait}|{m}": float(torch.cosine_similarity(dim, METHODS[m](pos, neg), 0)) for m in COSINE_METHODS}


def load_vectors(rec: VectorsRecord) -> dict[str, torch.Tensor]:
    """{"trait_method": [d_model]} from the vectors record."""
    return {k: ss.SteeringVector.load(p)[rec.layer] for k, p in rec.files.items()}


def as_vector(direction: torch.Tensor, inject_layer: int) -> ss.SteeringVector:
    return ss.SteeringVector({inject_layer: direction})


def v_perp(v: torch.Tensor, trait: str, seed: int) -> torch.Tensor:
    """The seed's random orthogonal perturbation of ``v`` (|v_perp| = |v|)."""
    return idf.random_orthogonal(v, seed=10_000 + 97 * seed + sum(map(ord, trait)))


# -- scorers ------------------------------------------------------------------------------------
def scorers(cfg: Config, embedder: Embedder) -> tuple[dict[str, list[Scorer]], ScorersRecord]:
    """Build and validate every scorer; the record lists accuracies and which are usable."""
    built = {t: build_scorers(t, embedder, seed=cfg.seed) for t in cfg.traits}
    rec = {t: [ScorerCheck(s.kind, s.accuracy, s.validation, s.usable) for s in ss_] for t, ss_ in built.items()}
    primary = {t: (b.kind if (b := best_scorer(s)) else None) for t, s in built.items()}
    return built, ScorersRecord(rec, primary)


# -- generations --------------------------------------------------------------------------------
def generate_cell(lm: LM, cfg: Config, prompts: Sequence[str], v: torch.Tensor | None, trait: str, seed: int,
                  inject_layer: int, alphas: Sequence[float], conditions: Sequence[str] = CONDITIONS
                  ) -> Generations:
    """Sample completions for every (condition, alpha) x prompt in one batched generate call.

    ``v=None`` generates the unsteered condition only. Returns {"condition@alpha": [texts]}.
    """
    if v is None:
        texts = ss.generate(lm, prompts, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                            temperature=cfg.temperature, seed=seed, batch_size=len(prompts), backend=cfg.backend)
        return Generations({"none@0": texts})
    p = v_perp(v, trait, seed)
    dirs = {"v": v, "v+v_perp": v + p, "v_perp": p}
    keys, vecs, alph, rows = [], [], [], []
    for c in conditions:
        for a in alphas:
            keys.append(f"{c}@{a:g}")
            for q in prompts:
                rows.append(q)
                vecs.append(as_vector(dirs[c], inject_layer))
                alph.append(float(a))
    texts = ss.generate(lm, rows, vector=vecs, alpha=alph, max_new_tokens=cfg.max_new_tokens, positions=cfg.positions,
                        do_sample=True, temperature=cfg.temperature, seed=seed, batch_size=len(rows),
                        backend=cfg.backend)
    n = len(prompts)
    return Generations({k: texts[i * n:(i + 1) * n] for i, k in enumerate(keys)})


def score_texts(built: dict[str, list[Scorer]], gens: Mapping[str, Generations]) -> Scores:
    """Score each generation cell with each scorer of its trait: {cell: {kind: {cond: [scores]}}}.

    ``gens`` maps a cell name ``trait|method|seed|prompts`` to its generations; the "none"
    cells (``*|none|seed|prompts``) are scored with every trait's scorers."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for cell, gen in gens.items():
        trait = cell.split("|")[0]
        traits = list(built) if trait == "*" else [trait]
        for t in traits:
            key = cell.replace("*", t, 1)
            out[key] = {s.kind: {c: [float(x) for x in s(texts)] for c, texts in gen.texts.items()} for s in built[t]}
    return Scores(out)


# -- effects ------------------------------------------------------------------------------------
ScoreCells = Mapping[str, dict[str, dict[str, list[float]]]]  # the ``scores`` record's cells


def effects(cfg: Config, scores: ScoreCells, primary: dict[str, str | None], usable: dict[str, dict[str, bool]],
            prompts: str = "neutral", alphas: Sequence[float] | None = None) -> list[EffectRow]:
    """Compare conditions per trait/method/alpha/scorer, seeds pooled (rows paired by prompt and seed)."""
    alphas = list(alphas if alphas is not None else cfg.alphas)
    rows = []
    for trait in cfg.traits:
        for method in cfg.methods:
            for kind in usable[trait]:
                rows += _effect_rows(cfg, scores, (trait, method, kind, prompts), alphas, usable[trait][kind],
                                     primary[trait] == kind)
    return rows


def effects_step(cfg: Config, scores: Scores, srec: ScorersRecord, usable: dict[str, dict[str, bool]]) -> EffectsRecord:
    """Step ``effects``: the rows on the neutral prompts and, with ``--shift``, on the shift prompts."""
    shift = effects(cfg, scores.cells, srec.primary, usable, prompts="shift", alphas=[cfg.probe_alpha]) if cfg.shift else []
    return EffectsRecord(effects(cfg, scores.cells, srec.primary, usable), shift)


def _effect_rows(cfg: Config, scores: ScoreCells, where: tuple[str, str, str, str], alphas: Sequence[float],
                 usable: bool, primary: bool) -> list[EffectRow]:
    """The rows of one trait x method x scorer x prompt set (``where``), one per alpha with enough scores."""
    trait, method, kind, prompts = where

    def pooled(cond: str) -> np.ndarray:
        vals: list[float] = []
        for seed in cfg.seeds:
            cell = scores.get(f"{trait}|{'none' if cond == 'none@0' else method}|{seed}|{prompts}")
            if cell is not None:
                vals += cell[kind].get(cond, [])
        return np.array(vals)

    none = pooled("none@0")
    if len(none) < 2:
        return []
    rows = []
    for a in alphas:
        s = {c: pooled(f"{c}@{a:g}") for c in CONDITIONS}
        if any(len(x) < 2 for x in s.values()):
            continue
        eff, diff, vsum, alone = (idf.compare(x, y, paired=True, seed=cfg.seed) for x, y in
                                  ((s["v"], none), (s["v+v_perp"], s["v"]), (s["v+v_perp"], none), (s["v_perp"], none)))
        v = verdict(usable, eff, diff, vsum, alone)
        rows.append(EffectRow(trait, method, a, kind, prompts, usable, primary, eff, diff, vsum, alone, v.verdict,
                              v.degenerate_ci, v.effect_retained, v.vperp_alone_effect))
    return rows


def verdict(usable: bool, eff: idf.Comparison, diff: idf.Comparison, vsum: idf.Comparison, alone: idf.Comparison
            ) -> Verdict:
    """Equivalence verdict of one row: counts only where v has a real effect and the scorer is usable.

    Args:
        eff, diff, vsum, alone: v vs none, v+v_perp vs v, v+v_perp vs none, v_perp vs none.
    """
    if not usable:
        return Verdict("scorer below 80% accuracy: not used")
    n = min(c.n for c in (eff, diff, alone))
    degenerate = [k for k, c in (("v_vs_none", eff), ("vperp_sum_vs_v", diff)) if not c.ci_high - c.ci_low > 1e-9]
    if n < MIN_N or degenerate:
        why = f"n = {n} < {MIN_N} scores per condition" if n < MIN_N else f"degenerate CI ({', '.join(degenerate)})"
        return Verdict(f"withheld: {why}; interval-based verdicts need more prompts (--n-prompts, --seeds)",
                       degenerate_ci=bool(degenerate))
    if not eff.real_effect:
        return Verdict("no real effect of v (d < 0.5 or CI includes 0): no equivalence claim")
    diff_ci_in = diff.ci_low <= 0 <= diff.ci_high
    strict = -0.5 < diff.ci_low and diff.ci_high < 0.5
    retained = vsum.d / eff.d if eff.d else float("nan")
    if strict:
        v = "equivalent (CI of d[v+v_perp vs v] inside (-0.5, 0.5))"
    elif diff_ci_in and abs(diff.d) < 0.5:
        v = "no detected difference (CI includes 0, but too wide to show equivalence)"
    else:
        v = "not equivalent (v+v_perp differs from v)"
    return Verdict(v, effect_retained=retained, vperp_alone_effect=alone.real_effect)


# -- next-token agreement -----------------------------------------------------------------------
def _agreement(cfg: Config, where: tuple[str, str, float, str], lv: torch.Tensor, others: list[torch.Tensor]
               ) -> Agreement:
    """One agreement row: means over prompts and draws (``others``: one [prompts vocab] per draw), top-1 with
    its cluster-bootstrap interval over prompts."""
    agg = [idf.logit_agreement(lv, o) for o in others]
    hits = np.stack([idf.top1_matches(lv, o).cpu().numpy() for o in others], 1).astype(float)  # [prompts draws]
    _, lo, hi = mean_ci(hits, seed=cfg.seed)
    return Agreement(*where, float(np.mean([x.l2 for x in agg])), float(np.mean([x.top1 for x in agg])),
                     float(np.mean([x.topk_overlap for x in agg])), (lo, hi), hits.shape[0], hits.shape[1])


def logits(lm: LM, cfg: Config, vecs: dict[str, torch.Tensor], inject_layer: int) -> LogitsRecord:
    """Next-token agreement of v with v+v_perp, a random direction, another trait's vector, PCA, none;
    and the worst case over random k-dim orthogonal subspaces."""
    sets = {"neutral": neutral_prompts(cfg.n_prompts), "shift": [r["prompt"] for r in shift_prompts(cfg.n_shift_prompts)]}
    base = {name: idf.next_token_logits(lm, ps) for name, ps in sets.items()}
    rows: list[Agreement] = []
    krows: list[SubspaceRow] = []
    for ti, trait in enumerate(cfg.traits):
        v = vecs[f"{trait}_dim"]
        other_name = cfg.traits[(ti + 1) % len(cfg.traits)] if len(cfg.traits) > 1 else None
        refs: dict[str, Callable[[int], torch.Tensor]] = {"v+v_perp": lambda s: v + v_perp(v, trait, s),
                "random": lambda s: idf.random_direction(v.numel(), float(v.norm()), seed=500 + s),
                "pca": lambda s: vecs[f"{trait}_pca"]}
        if other_name:
            o = vecs[f"{other_name}_dim"]
            refs[f"other ({other_name})"] = lambda s: o / o.norm() * v.norm()  # called in this iteration
        for name, ps in sets.items():
            for a in (cfg.alphas if name == "neutral" else (cfg.probe_alpha,)):
                lv = idf.next_token_logits(lm, ps, {inject_layer: a * v})
                cmp = {"none": [base[name]]}
                for ref, make in refs.items():
                    cmp[ref] = [idf.next_token_logits(lm, ps, {inject_layer: a * make(s)})
                                for s in (cfg.seeds if ref in ("v+v_perp", "random") else cfg.seeds[:1])]
                rows += [_agreement(cfg, (trait, name, a, ref), lv, other) for ref, other in cmp.items()]
        if ti >= cfg.k_traits:
            continue
        ps = sets["neutral"][:cfg.n_k_prompts]
        a = cfg.probe_alpha
        lv = idf.next_token_logits(lm, ps, {inject_layer: a * v})
        for k in progress(cfg.ks, desc=f"k-subspaces {trait}"):
            U = idf.orthogonal_subspace(v, k, seed=cfg.seed + k)
            dirs = v[None] + U * v.norm()  # [k d]: v + |v| u_i
            n = len(ps)
            big = idf.next_token_logits(lm, [p for _ in range(k) for p in ps], {inject_layer: a * dirs.repeat_interleave(n, 0)})
            ags = [idf.logit_agreement(lv, big[i * n:(i + 1) * n]) for i in range(k)]
            krows.append(SubspaceRow(trait, a, k, float(np.mean([x.top1 for x in ags])), float(min(x.top1 for x in ags)),
                                     float(np.mean([x.l2 for x in ags])), float(max(x.l2 for x in ags)),
                                     float(min(x.topk_overlap for x in ags))))
    return LogitsRecord(rows, krows)


# -- null space ---------------------------------------------------------------------------------
def nullspace(lm: LM, cfg: Config, vecs: dict[str, torch.Tensor], layer: int, batch_size: int = 16) -> NullspaceRecord:
    """Activation-covariance and logit-Jacobian spectra at L/4, L/2, 3L/4 (+ a finite-difference check).

    ``batch_size``: prompts per forward pass of the covariance (speed only).
    """
    L = lm.n_layers
    layers = sorted({L // 4, L // 2, 3 * L // 4})
    prompts = neutral_prompts()
    prompts += [r["prompt"] for r in shift_prompts()]
    for t in cfg.traits:
        for r in read_jsonl(data_path("traits", f"{t}.jsonl")):
            prompts += [r["positive"], r["negative"]]
    cov = idf.residual_covariance_spectra(lm, prompts[:cfg.n_cov_prompts], layers, batch_size, show_progress=True)
    jacobian: dict[str, idf.Spectrum] = {}
    fd_check = None
    ru = idf.unembed_r(lm)
    jp = [lm.format_chat(p) for p in neutral_prompts(cfg.n_jac_prompts)]
    ratios = {}
    probe_null: dict[str, idf.ProbeNullFraction] = {}
    for l in progress(layers, desc="jacobians"):
        sig, jfs = [], []
        for text in jp:
            jf = idf.final_jacobian(lm, text, l)
            jfs.append(jf)
            sig.append(torch.linalg.svdvals(ru.double() @ jf.double()).float().numpy())
        jacobian[str(l)] = idf.spectrum(np.mean(sig, 0), lm.d_model)
        probe_null[str(l)] = idf.probe_null_fraction(ru.double() @ jfs[0].double(), PAPER_PROBES, cfg.seed)
        if l == layer:
            for t in cfg.traits:
                v = vecs[f"{t}_dim"]
                jv = float(np.mean([(ru @ (jf @ v)).norm() for jf in jfs]))
                jp_ = float(np.mean([(ru @ (jf @ v_perp(v, t, s))).norm() for jf in jfs for s in cfg.seeds]))
                ratios[t] = JRatio(jv, jp_, jp_ / jv)
            g = torch.Generator().manual_seed(cfg.seed)
            probes = torch.randn(3, lm.d_model, generator=g)
            probes = probes / probes.norm(dim=1, keepdim=True)
            fd_check = FdCheck(l, idf.finite_difference_check(lm, jp[0], l, probes, eps=0.05, jf=jfs[0]))
    return NullspaceRecord(layers, {str(l): cov[l].spectrum for l in layers}, jacobian, cov[layers[-1]].n_tokens,
                           fd_check, ratios, probe_null)
