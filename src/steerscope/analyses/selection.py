"""Arditi-style direction selection (Arditi et al. 2024, arXiv 2406.11717; scoring as in paper A).

1. Candidates: r[l, p] = mean_harmful h[l, p] - mean_harmless h[l, p] on the train split, for every
   layer l (resid_pre) and post-instruction position p (the chat-template tokens after the
   instruction, default the last 5), read in one recorded forward pass per batch.
2. Scores per candidate, each one forward pass (no generation) over the validation prompts:
   bypass = mean refusal log-odds on harmful val under activation addition alpha = -1 (paper A),
   induce = mean refusal log-odds on harmless val under alpha = +1, both steered at all positions
   in one batch with per-row alphas; KL = mean first-token KL(base || ablated) on harmless val
   under directional ablation of r-hat at every layer.
3. Filter: induce > 0, KL < 0.1, l < 0.8 L. Pick the candidate minimising
   sigmoid(bypass) - sigmoid(induce). KL is computed lazily, best score first, until one passes
   (plus ``kl_top`` more for the report), which gives the same pick as scoring every candidate.
4. Magnitude (our extension, for models whose useful alpha is not 1): with ``alphas`` = a grid
   of multiples of the unnormalised DIM vector, every (layer, position) is scored at every
   alpha (bypass at -alpha, induce at +alpha) and the pick is the best (layer, position, alpha)
   under the same filters (KL does not depend on alpha). The returned vector is
   ``alpha* x r[l*, p*]``, so alpha = -1 / +1 on it is the selected bypass / induce setting; the
   factor is recorded in the provenance (``args["scale"]``) with the unscaled norm and the ratio
   of the steering norm to the mean residual norm at that site. ``alphas=(1.0,)`` is paper A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from steerscope.errors import DataError
from steerscope.metrics.refusal import kl_divergence, refusal_logodds, refusal_token_ids
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.sites import Site
from steerscope.steer import ablation, recording, steering
from steerscope.vector import Provenance, SteeringVector, dataset_hash


@dataclass
class Candidate:
    """Scores of one (layer, position) DIM candidate; ``kl`` is None where it was not needed."""

    layer: int
    position: int
    bypass: float
    induce: float
    kl: float | None = None
    alpha: float = 1.0  # multiple of the unnormalised DIM vector the scores were taken at

    @property
    def score(self) -> float:
        return _sigmoid(self.bypass) - _sigmoid(self.induce)


@dataclass
class Selection:
    """Result of :func:`select_direction`: the chosen vector, every candidate and baselines."""

    vector: SteeringVector
    chosen: Candidate
    candidates: list[Candidate]
    baseline_harmful: float
    baseline_harmless: float
    positions: list[int]
    layers: list[int]
    norms: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"layer": self.chosen.layer, "position": self.chosen.position, "chosen": vars(self.chosen),
                "score": self.chosen.score, "baseline_harmful_logodds": self.baseline_harmful,
                "baseline_harmless_logodds": self.baseline_harmless, "positions": self.positions,
                "layers": self.layers, "candidates": [vars(c) | {"score": c.score} for c in self.candidates],
                "norm": float(self.vector[self.chosen.layer].norm()), "alpha": self.chosen.alpha,
                "norms": self.norms}


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mean_diffs(lm: LM, harmful: Sequence[str], harmless: Sequence[str], layers: Sequence[int],
               positions: Sequence[int], batch_size: int = 32, show_progress: bool = False) -> torch.Tensor:
    """DIM candidates [layer position d_model] from chat-formatted prompts (one pass per batch)."""
    sums = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        total = torch.zeros(len(layers), len(positions), lm.d_model, dtype=torch.float64)
        for i in progress(range(0, len(prompts), batch_size), desc=f"dim {name}", enabled=show_progress):
            enc = lm.tokenize([lm.format_chat(p) for p in prompts[i : i + batch_size]], padding_side="left")
            with recording(lm, [Site(l, "resid_pre") for l in layers]) as cache, torch.no_grad():
                lm.model(**enc, use_cache=False)
            idx = torch.tensor(list(positions))  # left padding: negative positions index the real tail
            for j, l in enumerate(layers):
                total[j] += cache[Site(l, "resid_pre")][:, idx].double().sum(0).cpu()
        sums[name] = total / len(prompts)
    return (sums["harmful"] - sums["harmless"]).float()


def first_token_logits(lm: LM, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Next-token logits at the last prompt position, chat template applied: [n vocab]."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i : i + batch_size]], padding_side="left")
        with torch.no_grad():
            out.append(lm.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(out)


def steered_logodds(lm: LM, vector: SteeringVector, harmful: Sequence[str], harmless: Sequence[str],
                    refusal_ids: Sequence[int], batch_size: int = 64, alpha: float = 1.0) -> tuple[float, float]:
    """(bypass, induce): mean refusal log-odds on harmful at -alpha and harmless at +alpha."""
    prompts = list(harmful) + list(harmless)
    alphas = torch.tensor([-alpha] * len(harmful) + [alpha] * len(harmless))
    scores = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i : i + batch_size]], padding_side="left")
        with steering(lm, vector, alpha=alphas[i : i + batch_size]), torch.no_grad():
            logits = lm.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1]
        scores.append(refusal_logodds(logits, refusal_ids).cpu())
    s = torch.cat(scores)
    return float(s[: len(harmful)].mean()), float(s[len(harmful) :].mean())


def ablation_kl(lm: LM, direction: torch.Tensor, harmless: Sequence[str], base_logits: torch.Tensor) -> float:
    """Mean first-token KL(base || directional ablation of ``direction``) on ``harmless``."""
    with ablation(lm, direction):
        abl = first_token_logits(lm, harmless)
    return float(kl_divergence(base_logits, abl).mean())


def select_direction(
    lm: LM,
    train: tuple[Sequence[str], Sequence[str]],
    val: tuple[Sequence[str], Sequence[str]],
    positions: Sequence[int] = (-5, -4, -3, -2, -1),
    layers: Sequence[int] | None = None,
    max_layer_frac: float = 0.8,
    kl_max: float = 0.1,
    kl_top: int = 3,
    show_progress: bool = False,
    alphas: Sequence[float] = (1.0,),
) -> Selection:
    """Select a behaviour direction Arditi-style (see the module docstring); paper A's refusal search.

    Args:
        lm: the model (for refusal: the refusing organism).
        train: (harmful, harmless) prompts for the means.
        val: (harmful, harmless) prompts for the scores.
        positions: post-instruction positions, negative from the end of the templated prompt.
        layers: candidate layers (default every layer below ``max_layer_frac * n_layers``).
        kl_max: the ablation-KL filter (candidates at or above it are skipped).
        kl_top: extra candidates (beyond the chosen one) that get a KL score for the report.
        alphas: multiples of the DIM vector to score (step 4 of the module docstring); the
            returned vector is scaled by the chosen one.

    Returns:
        A :class:`Selection`; ``vector`` is the DIM vector at the chosen layer, scaled by the chosen alpha.

    Example:
        >>> import steerscope as ss
        >>> from steerscope.data.refusal_prompts import load_split
        >>> lm = ss.load_model("smollm2-135m-safe")
        >>> tr = (load_split("harmful", "train")[:16], load_split("harmless", "train")[:16])
        >>> va = (load_split("harmful", "val")[:8], load_split("harmless", "val")[:8])
        >>> sel = ss.select_direction(lm, tr, va, layers=[6, 9, 12])
        >>> sel.chosen.layer in (6, 9, 12)
        True
    """
    cut = int(max_layer_frac * lm.n_layers)
    layers = [l for l in (layers if layers is not None else range(lm.n_layers)) if l < cut]
    if not layers:
        raise DataError(f"no candidate layer below {max_layer_frac} x {lm.n_layers} layers: pass layers= or raise "
                          "max_layer_frac")
    positions = list(positions)
    dims = mean_diffs(lm, train[0], train[1], layers, positions, show_progress=show_progress)
    ids = refusal_token_ids(lm.tokenizer)
    base_h = refusal_logodds(first_token_logits(lm, val[0]), ids)
    base_logits = first_token_logits(lm, val[1])
    base_s = refusal_logodds(base_logits, ids)
    cands = _score_candidates(lm, dims, layers, positions, alphas, val, ids, show_progress)

    def kl_of(c: Candidate) -> float:
        return ablation_kl(lm, dims[layers.index(c.layer), positions.index(c.position)], val[1], base_logits)

    chosen = _pick(cands, kl_of, kl_max, kl_top)
    raw = dims[layers.index(chosen.layer), positions.index(chosen.position)]
    vec, norms = _chosen_vector(lm, raw, chosen, train, val[1], alphas)
    return Selection(vec, chosen, cands, float(base_h.mean()), float(base_s.mean()), positions, layers, norms)


def _chosen_vector(lm: LM, raw: torch.Tensor, chosen: Candidate, train: tuple[Sequence[str], Sequence[str]],
                   harmless_val: Sequence[str], alphas: Sequence[float]) -> tuple[SteeringVector, dict[str, float]]:
    """Step 4's output: the chosen DIM vector ``raw`` [d_model] scaled by the chosen alpha, with its
    provenance, and its norms (unscaled, scaled, the mean residual norm at its site, their ratio)."""
    norms = {"unscaled": float(raw.norm()), "scaled": float(raw.norm()) * abs(chosen.alpha),
             "resid": resid_norm(lm, harmless_val, chosen.layer, chosen.position)}
    norms["scaled_over_resid"] = norms["scaled"] / max(norms["resid"], 1e-12)
    prov = Provenance.for_model(lm, method="dim", positions=[chosen.position],
                                dataset_hash=dataset_hash(list(train[0]) + ["|"] + list(train[1])),
                                n_examples=len(train[0]) + len(train[1]),
                                args={"site": "resid_pre", "selection": "arditi/paper-A",
                                      "bypass": chosen.bypass, "induce": chosen.induce, "kl": chosen.kl,
                                      "scale": chosen.alpha, "alpha_grid": list(alphas), **{
                                          f"norm_{k}": v for k, v in norms.items()}})
    return SteeringVector({chosen.layer: raw * chosen.alpha}, "resid_pre", prov), norms


def _score_candidates(lm: LM, dims: torch.Tensor, layers: list[int], positions: list[int], alphas: Sequence[float],
                      val: tuple[Sequence[str], Sequence[str]], ids: Sequence[int],
                      show_progress: bool) -> list[Candidate]:
    """Bypass and induce scores for every (layer, position, alpha) candidate: one forward pass each."""
    cands = []
    grid = [(j, l, k, p, a) for j, l in enumerate(layers) for k, p in enumerate(positions) for a in alphas]
    for j, l, k, p, a in progress(grid, desc="score candidates", enabled=show_progress):
        b, i = steered_logodds(lm, SteeringVector({l: dims[j, k]}), val[0], val[1], ids, alpha=a)
        cands.append(Candidate(l, p, b, i, alpha=a))
    return cands


def _pick(cands: list[Candidate], kl_of: Callable[[Candidate], float], kl_max: float, kl_top: int) -> Candidate:
    """Best score with induce > 0 and ablation KL < ``kl_max`` (KL computed lazily, best first, plus ``kl_top``
    more for the report); with none passing, the best score (flagged by its KL)."""
    chosen = None
    extra = 0
    kls: dict[tuple[int, int], float] = {}
    for c in sorted(cands, key=lambda c: c.score):
        if c.induce <= 0:
            continue
        if (c.layer, c.position) not in kls:
            kls[c.layer, c.position] = kl_of(c)
        c.kl = kls[c.layer, c.position]
        if chosen is None and c.kl < kl_max:
            chosen = c
        elif chosen is not None:
            extra += 1
        if chosen is not None and extra >= kl_top:
            break
    if chosen is None:  # nothing passes: fall back to the best score, flagged by its KL
        chosen = min(cands, key=lambda c: c.score)
    if chosen.kl is None:
        chosen.kl = kl_of(chosen)
    return chosen

def resid_norm(lm: LM, prompts: Sequence[str], layer: int, position: int, batch_size: int = 32) -> float:
    """Mean L2 norm of ``resid_pre`` at (``layer``, ``position``) over chat-formatted ``prompts``."""
    total = 0.0
    for i in range(0, len(prompts), batch_size):
        enc = lm.tokenize([lm.format_chat(p) for p in prompts[i : i + batch_size]], padding_side="left")
        with recording(lm, [Site(layer, "resid_pre")]) as cache, torch.no_grad():
            lm.model(**enc, use_cache=False, logits_to_keep=1)
        total += float(cache[Site(layer, "resid_pre")][:, position].float().norm(dim=-1).sum())
    return total / max(len(prompts), 1)

