"""The rest of paper B on the headline (penultimate-layer) vector: SAE features, seeds, transfer, gate.

Each part is a set of resumable steps; a part that is switched off in the configuration, or whose
vector was not trained, is skipped. Order: the extra seeds (one training each), SAE/DiffSAE (no
training), transfer to the sibling model (one training there), the gated vector (one training).
"""

from __future__ import annotations

from typing import Any

from steerscope.models.load import LM
from steerscope.studies.reasoning import gate, sae_step, seeds, transfer
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.runner import Run
from steerscope.vector import SteeringVector


def run_extras(run: Run, lm: LM, cfg: ReasoningConfig, vecs: dict[str, SteeringVector], evals: dict[str, dict],
               test: list, device: str) -> dict[str, Any]:
    """Run (or resume) the four parts; returns ``{"sae", "seeds", "transfer", "gate"}`` records that exist."""
    layer = lm.n_layers - 2
    name = f"L{layer}"
    if name not in vecs or name not in evals:
        return {}
    out: dict[str, Any] = {}
    if cfg.seeds > 1:
        per = {f"seed {cfg.seed}": {"seed": cfg.seed, "eval": evals[name], "norm": float(vecs[name][layer].norm())}}
        for label, r in seeds.seed_runs(run, lm, cfg, layer, test).items():
            s = int(label.rsplit("seed", 1)[1])
            per[f"seed {s}"] = {"seed": s, "eval": r["eval"], "norm": r["train"]["norms"].get(str(layer))}
        out["seeds"] = seeds.seeds_summary(evals["base"], per)
    if cfg.sae:
        out["sae"] = run.step("sae", lambda: sae_step.sae_runs(lm, cfg, vecs[name], layer))
    tr = transfer.transfer_runs(run, lm, cfg, layer, test, evals["base"], evals[name], device)
    if tr is not None:
        out["transfer"] = tr
    if cfg.gate_compare and not cfg.gate:
        out["gate"] = gate.gate_runs(run, lm, cfg, layer, test, evals["base"], evals[name])
    return out
