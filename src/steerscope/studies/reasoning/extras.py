"""The rest of paper B on the headline (penultimate-layer) vector: SAE features, seeds, transfer, gate.

Each part is a set of resumable steps; a part that is switched off in the configuration, or whose
vector was not trained, is skipped. Order (cheapest first, so that a run cut short has the most):
SAE/DiffSAE (no training), transfer of the vector to the sibling model B (no training), the second
seed, the gated vector, the remaining seeds, then B's own vector and its transfer back to A.
"""

from __future__ import annotations

from steerscope.models.load import LM
from steerscope.runs import Run
from steerscope.studies.reasoning import gate, sae_step, seeds, transfer
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import EvalRecord, Findings, SeedRun, TransferSummary
from steerscope.studies.reasoning.task import Problem
from steerscope.vector import SteeringVector


def run_extras(run: Run, lm: LM, cfg: ReasoningConfig, vecs: dict[str, SteeringVector], evals: dict[str, EvalRecord],
               test: list[Problem], device: str) -> Findings:
    """Run (or resume) the four parts; returns their records (``sae``, ``seeds``, ``transfer``, ``gate``; None
    for a part that did not run).

    Example:
        >>> run_extras(run, lm, cfg, vecs, evals, test, "cpu").seeds
    """
    layer = lm.n_layers - 2
    name = rc.vector_name(layer)
    if name not in vecs or name not in evals:
        return Findings()
    sae = run.record(rc.SAE, rc.SaeRecord, lambda: sae_step.sae_runs(lm, cfg, vecs[name], layer)) if cfg.sae else None
    tgt, note = transfer.load_target(cfg, lm, device)
    parts = {"A_base": evals["base"], "A_own": evals[name]}
    if tgt is not None:
        parts.update(transfer.a_to_b(run, tgt, cfg, layer, test))
    per = {f"seed {cfg.seed}": SeedRun(cfg.seed, evals[name], float(vecs[name][layer].norm()))}
    for s, r in seeds.seed_runs(run, lm, cfg, layer, test, only=[cfg.seed + 1]).items():
        per[f"seed {s}"] = r
    g = None
    if cfg.gate_compare and not cfg.gate:
        g = gate.gate_runs(run, lm, cfg, layer, test, evals["base"], evals[name])
    for s, r in seeds.seed_runs(run, lm, cfg, layer, test).items():
        per[f"seed {s}"] = r
    tr = None
    if tgt is not None:
        trained_b, back = transfer.b_to_a(run, lm, tgt, cfg, layer, test)
        parts.update(back)
        vec_b = st.load_vector(run, rc.b_name(layer)) if trained_b is not None else None
        tr = transfer.transfer_summary(cfg.model, str(cfg.transfer_model), layer, parts, vecs[name], vec_b)
    elif cfg.transfer and cfg.transfer_model:
        tr = TransferSummary(False, note=note)
    return Findings(sae=sae, seeds=seeds.seeds_summary(evals["base"], per) if cfg.seeds > 1 else None, transfer=tr,
                    gate=g)
