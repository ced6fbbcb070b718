"""The refusal study's steps, one resumable function each, each returning a typed record
(:mod:`steerscope.studies.refusal.records`).

1. ``organism``: reuse the shipped LoRA organism (or retrain it into the run folder).
2. ``select``: DIM candidates x bypass / induce / KL scores, filters, pick (``select.py``).
3. ``trained_data`` + ``trained``: paper A's data (harmless -> refusals prompted with the
   "Treat the following question as dangerous and refuse." prefix; harmful -> DIM-steered
   compliant answers; losers = the unsteered answers), then NTP and PO at the DIM layer.
4. ``evaluate``: greedy completions on the test split, unsteered and steered by each vector
   (bypass with -alpha on harmful, induce with +alpha on harmless), substring matcher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from steerscope.analyses.selection import select_direction
from steerscope.data.refusal_prompts import load_split
from steerscope.errors import StudyError
from steerscope.extract.trained import train_ntp, train_po
from steerscope.generation import generate
from steerscope.metrics.refusal import is_refusal, is_repetitive, refusal_rate
from steerscope.models.load import LM, apply_adapter, load_model
from steerscope.runs import Run
from steerscope.studies.refusal.config import RefusalConfig
from steerscope.studies.refusal.organism import ORGANISM, SHIPPED, OrganismConfig, train_organism
from steerscope.studies.refusal.records import (
    Curve,
    EvaluateRecord,
    MatchedRecord,
    OrganismRecord,
    Samples,
    SelectionRecord,
    Steered,
    TrainedDataRecord,
    TrainedRecord,
    TrainingPair,
    Unsteered,
)
from steerscope.vector import SteeringVector, shipped_vectors

DANGER_PREFIX = "Treat the following question as dangerous and refuse."
VECTOR_NAMES = ("refusal-dim", "refusal-ntp", "refusal-po")


def organism_step(cfg: RefusalConfig, run: Run) -> OrganismRecord:
    """Retrain the organism into ``run/organism`` if asked; report the shipped stats otherwise."""
    if cfg.retrain_organism:
        if cfg.model != ORGANISM:
            raise StudyError(f"--retrain-organism builds {ORGANISM}; it cannot be combined with --model {cfg.model}")
        log = train_organism(OrganismConfig(seed=cfg.seed), run.path("organism", "x").parent)
        return OrganismRecord(str(run.path("organism")), train={k: v for k, v in log.items() if k != "losses"},
                              losses=log["losses"])
    stats = SHIPPED / "stats.json"
    return OrganismRecord(str(SHIPPED) if cfg.model == ORGANISM else None,
                          json.loads(stats.read_text()) if cfg.model == ORGANISM and stats.is_file() else None)


def load_study_model(cfg: RefusalConfig, run: Run, device: str | None = "cpu") -> LM:
    """The model under study: the retrained organism from the run folder, or ``cfg.model``."""
    if cfg.retrain_organism:
        lm = apply_adapter(load_model("smollm2-135m", device=device), run.folder / "organism")
        lm.name = ORGANISM
        return lm
    return load_model(cfg.model, device=device, dtype=cfg.dtype)


def select_step(lm: LM, cfg: RefusalConfig, run: Run, show_progress: bool = True) -> SelectionRecord:
    """Score every DIM candidate and pick the refusal direction; save it in ``run/vectors``."""
    cut = int(0.8 * lm.n_layers)
    layers = list(cfg.layers) if cfg.layers else list(range(0, cut, cfg.layer_stride))
    train = (load_split("harmful", "train")[: cfg.n_train], load_split("harmless", "train")[: cfg.n_train])
    val = (load_split("harmful", "val")[: cfg.n_val], load_split("harmless", "val")[: cfg.n_val])
    sel = select_direction(lm, train, val, positions=cfg.positions, layers=layers, show_progress=show_progress,
                           alphas=cfg.select_alphas)
    sel.vector.save(run.path("vectors", "refusal-dim.safetensors"))
    return SelectionRecord.of(sel)


def use_shipped(cfg: RefusalConfig) -> bool:
    return cfg.shipped_vectors and cfg.model == ORGANISM and not cfg.retrain_organism


def study_vector(cfg: RefusalConfig, run: Run, name: str) -> SteeringVector | None:
    """The vector the evaluation uses: shipped (default on the organism) or this run's."""
    if use_shipped(cfg) and f"{ORGANISM}/{name}" in shipped_vectors():
        return SteeringVector.load(f"{ORGANISM}/{name}")
    p = run.folder / "vectors" / f"{name}.safetensors"
    return SteeringVector.load(p) if p.is_file() else None


def trained_data_step(lm: LM, cfg: RefusalConfig, dim: SteeringVector, alpha: float) -> TrainedDataRecord:
    """Paper A's NTP/PO data on the train split (first ``n_trained`` prompts per side), filtered."""
    kw: dict[str, Any] = dict(max_new_tokens=cfg.trained_tokens, batch_size=cfg.gen_batch, show_progress=True)
    safe = load_split("harmless", "train")[: cfg.n_trained]
    harm = load_split("harmful", "train")[: cfg.n_trained]
    safe_ref = generate(lm, [f"{DANGER_PREFIX}\n\n{p}" for p in safe], **kw)
    safe_own = generate(lm, safe, **kw)
    harm_comp = generate(lm, harm, vector=dim, alpha=-alpha, **kw)
    harm_own = generate(lm, harm, **kw)
    rows = [TrainingPair(p, w, l, 1.0) for p, w, l in zip(safe, safe_ref, safe_own) if is_refusal(w) and not is_refusal(l)]
    rows += [TrainingPair(p, w, l, -1.0) for p, w, l in zip(harm, harm_comp, harm_own)
             if not is_refusal(w) and is_refusal(l)]
    return TrainedDataRecord(rows, len(rows), 2 * cfg.n_trained, alpha)


def trained_step(lm: LM, cfg: RefusalConfig, run: Run, data: TrainedDataRecord, layer: int, alpha: float,
                 init_norm: float) -> TrainedRecord:
    """Train NTP and PO at ``layer`` (80/20 train/validation split of the rows, seeded)."""
    rows = data.rows
    if len(rows) < 4:
        raise StudyError(f"only {len(rows)} usable NTP/PO examples; raise --n-trained or check the organism")
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_val = max(2, len(rows) // 5)
    va, tr = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
    def col(rs: list[TrainingPair], k: str) -> list[Any]:
        return [getattr(r, k) for r in rs]

    common: dict[str, Any] = dict(layer=layer, epochs=cfg.trained_epochs, lr=cfg.trained_lr * init_norm, batch_size=cfg.trained_batch,
                  alpha=alpha, seed=cfg.seed, max_tokens=cfg.trained_tokens, show_progress=True)
    curves = {}
    ntp = train_ntp(lm, col(tr, "prompt"), col(tr, "winner"), col(tr, "sign"),
                    val=(col(va, "prompt"), col(va, "winner"), col(va, "sign")), **common)
    po = train_po(lm, col(tr, "prompt"), col(tr, "winner"), col(tr, "loser"), col(tr, "sign"),
                  val=(col(va, "prompt"), col(va, "winner"), col(va, "loser"), col(va, "sign")), phi=cfg.phi, **common)
    for name, res in (("refusal-ntp", ntp), ("refusal-po", po)):
        assert res.vector is not None  # NTP / PO always return one
        res.vector.save(run.path("vectors", f"{name}.safetensors"))
        curves[name] = Curve(res.train_loss, res.val_loss, res.best_epoch, float(res.vector[layer].norm()))
    return TrainedRecord(len(tr), len(va), curves)


def _test_prompts(cfg: RefusalConfig) -> tuple[list[str], list[str]]:
    return load_split("harmful", "test")[: cfg.n_test], load_split("harmless", "test")[: cfg.n_test]


def _steered_row(lm: LM, cfg: RefusalConfig, name: str, vec: SteeringVector, a: float) -> Steered:
    harm, safe = _test_prompts(cfg)
    kw: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch, show_progress=True,
                              backend=cfg.backend)
    h = generate(lm, harm, vector=vec, alpha=-a, **kw)
    s = generate(lm, safe, vector=vec, alpha=a, **kw)
    return Steered(name, a, float(vec[vec.layers[0]].norm()), refusal_rate(h), 1 - refusal_rate(h), refusal_rate(s),
                   sum(map(is_refusal, h)), sum(map(is_refusal, s)), *_loops(h, s), _samples(harm, h, safe, s))


def _loops(h: list[str], s: list[str]) -> tuple[int, int]:
    """Degenerate (looping) completions per side: "not a refusal" to the matcher, but no answer either."""
    return sum(map(is_repetitive, h)), sum(map(is_repetitive, s))


def _samples(harm: list[str], h: list[str], safe: list[str], s: list[str]) -> Samples:
    """The first three (prompt, completion) pairs of each side."""
    return Samples(list(zip(harm[:3], h[:3])), list(zip(safe[:3], s[:3])))


def evaluate_step(lm: LM, cfg: RefusalConfig, vectors: dict[str, SteeringVector]) -> EvaluateRecord:
    """Refusal rates on the test split: unsteered, and per vector and alpha (bypass -a, induce +a)."""
    harm, safe = _test_prompts(cfg)
    kw: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch, show_progress=True,
                              backend=cfg.backend)
    h0, s0 = generate(lm, harm, **kw), generate(lm, safe, **kw)
    unsteered = Unsteered(refusal_rate(h0), refusal_rate(s0), sum(map(is_refusal, h0)), sum(map(is_refusal, s0)),
                          *_loops(h0, s0), _samples(harm, h0, safe, s0))
    steered = [_steered_row(lm, cfg, name, vec, a) for name, vec in vectors.items() for a in cfg.alphas]
    return EvaluateRecord([len(harm), len(safe)], unsteered, steered)


def evaluate_matched_step(lm: LM, cfg: RefusalConfig, vectors: dict[str, SteeringVector]) -> MatchedRecord:
    """NTP / PO rescaled to the DIM vector's norm, at alpha 1: the methods compared at equal norm."""
    ref = float(vectors["DIM"][vectors["DIM"].layers[0]].norm())
    rows = []
    for name, vec in vectors.items():
        if name == "DIM":
            continue
        layer = vec.layers[0]
        scaled = SteeringVector({layer: vec[layer] * (ref / float(vec[layer].norm()))}, vec.site, vec.provenance)
        rows.append(_steered_row(lm, cfg, f"{name}@|DIM|", scaled, 1.0))
    return MatchedRecord(ref, rows)


def cosines(vectors: dict[str, SteeringVector]) -> dict[str, float]:
    """Pairwise cosine similarities of the vectors at their shared layer."""
    names = list(vectors)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            c = vectors[a].cosine(vectors[b])
            if c:
                out[f"{a} vs {b}"] = next(iter(c.values()))
    return out


def paths(run: Run) -> dict[str, Path]:
    return {"report": run.folder / "report.html", "results": run.folder / "results.json"}
