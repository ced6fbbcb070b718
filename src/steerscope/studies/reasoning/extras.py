"""The rest of paper B on the headline (penultimate-layer) vector: SAE features, seeds, transfer, gate.

Each part is a set of resumable steps; a part that is switched off in the configuration, or whose
vector was not trained, is skipped. Order (cheapest first, so that a run cut short has the most):
SAE/DiffSAE (no training), transfer of the vector to the sibling model B (no training), the second
seed, the gated vector, the remaining seeds, then B's own vector and its transfer back to A.
"""

from __future__ import annotations

from typing import Any

from steerscope.models.load import LM
from steerscope.runs import Run
from steerscope.studies.reasoning import gate, sae_step, seeds, transfer
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.vector import SteeringVector


def run_extras(run: Run, lm: LM, cfg: ReasoningConfig, vecs: dict[str, SteeringVector], evals: dict[str, dict[str, Any]],
               test: list[Any], device: str) -> dict[str, Any]:
    """Run (or resume) the four parts; returns ``{"sae", "seeds", "transfer", "gate"}`` records that exist."""
    layer = lm.n_layers - 2
    name = f"L{layer}"
    if name not in vecs or name not in evals:
        return {}
    out: dict[str, Any] = {}
    if cfg.sae and (r := run.step("sae", lambda: sae_step.sae_runs(lm, cfg, vecs[name], layer))) is not None:
        out["sae"] = r
    tgt, note = transfer.load_target(cfg, lm, device)
    parts = {"A_base": evals["base"], "A_own": evals[name]}
    if tgt is not None:
        parts.update(transfer.a_to_b(run, tgt, cfg, layer, test))
    per = {f"seed {cfg.seed}": {"seed": cfg.seed, "eval": evals[name], "norm": float(vecs[name][layer].norm())}}
    for s, r in seeds.seed_runs(run, lm, cfg, layer, test, only=[cfg.seed + 1]).items():
        per[f"seed {s}"] = r
    if cfg.gate_compare and not cfg.gate:
        if (g := gate.gate_runs(run, lm, cfg, layer, test, evals["base"], evals[name])) is not None:
            out["gate"] = g
    for s, r in seeds.seed_runs(run, lm, cfg, layer, test).items():
        per[f"seed {s}"] = r
    if cfg.seeds > 1:
        out["seeds"] = seeds.seeds_summary(evals["base"], per)
    vec_b = None
    if tgt is not None:
        parts.update(transfer.b_to_a(run, lm, tgt, cfg, layer, test))
        vec_b = st.load_vector(run, f"B_L{layer}") if "train_B" in parts else None
        out["transfer"] = transfer.transfer_summary(cfg.model, str(cfg.transfer_model), layer, parts, vecs[name], vec_b)
    elif cfg.transfer and cfg.transfer_model:
        out["transfer"] = {"done": False, "note": note}
    return out
