"""EAP-IG versus exact activation patching of EVERY edge, in one run: time ratio and agreement.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_eapig.py [--model smollm2-135m-safe]
        [--vector smollm2-135m-safe/refusal-dim] [--alpha -1] [--n 3] [--tokens 12] [--check 10]

On the same prompts, metric and graph (every edge from the steering layer up), one after the other:
  1. EAP-IG (T=10 midpoint steps): a score for every edge and node (``attribution.eap_ig``).
  2. Exact single-edge activation patching of every edge of the graph
     (``edge_patching.edge_effects``: rows = edges x samples, each row computed from its
     receiver's block up, many rows per forward). Nothing is extrapolated: every edge is patched.
  3. Exact node patching of every node (reference; ``edge_patching.node_effects``).
  4. A correctness check: ``--check`` edges (the largest by exact |effect|, and random ones) patched
     again one forward per edge with ``circuits.patched_metric``; the largest difference is
     reported, and the time per unbatched edge (context only, not used in the ratio).

Reports the headline ratio t(exact, all edges) / t(EAP-IG) and Spearman between EAP-IG edge
scores and exact edge effects over all edges and over the top-100 / top-20 edges by exact
|effect|, plus node-level Spearman. Timings are wall-clock on whatever else the machine runs
(the load average is printed); both methods skip samples with no scored position and columns
that cannot change the metric, in the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from scipy.stats import spearmanr

import steerscope as ss
from steerscope import circuits as C
from steerscope.data import data_path, read_jsonl


def _rho(x: torch.Tensor, y: torch.Tensor) -> float:
    return round(float(spearmanr(x.numpy(), y.numpy()).statistic), 3)


def _top(exact: torch.Tensor, est: torch.Tensor, k: int) -> float:
    """Spearman on the k entries of largest exact |effect|."""
    idx = exact.abs().argsort(descending=True)[:k]
    return _rho(exact[idx], est[idx])


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-safe")
    ap.add_argument("--vector", default="smollm2-135m-safe/refusal-dim")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=-1.0)
    ap.add_argument("--prompts", default="harmful", choices=["harmful", "harmless"])
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1, help="samples per pass (both methods)")
    ap.add_argument("--check", type=int, default=10, help="edges re-patched one forward each (0: none)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    load0 = os.getloadavg()
    lm = ss.load_model(a.model)
    vec = ss.SteeringVector.load(a.vector)
    vec = vec.select([a.layer if a.layer is not None else vec.layers[0]])
    prompts = [r["instruction"] for r in read_jsonl(data_path("refusal", f"{a.prompts}.jsonl"))][300 : 300 + a.n]
    pb = C.prepare(lm, prompts, vec, a.alpha, max_new_tokens=a.tokens)

    t0 = time.perf_counter()
    att = C.eap_ig(lm, pb, vec, a.alpha, steps=a.steps, batch_size=a.batch)
    t_eap = time.perf_counter() - t0
    g = att.graph
    t0 = time.perf_counter()
    exact = C.edge_effects(lm, pb, vec, a.alpha, g, batch_size=a.batch, show_progress=a.progress)
    t_edges = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact_nodes = C.node_effects(lm, pb, vec, a.alpha, g, batch_size=a.batch)
    t_nodes = time.perf_counter() - t0
    t0 = time.perf_counter()
    C.eap_ig(lm, pb, vec, a.alpha, steps=a.steps, batch_size=a.batch)
    t_eap2 = time.perf_counter() - t0

    v = g.valid
    ex, est = exact[v], att.edges[v]
    res = {
        "model": a.model, "vector": a.vector, "layer": g.layer0, "alpha": a.alpha, "n_prompts": a.n,
        "tokens": a.tokens, "steps": a.steps, "seq_len": pb.ids.shape[1],
        "samples_with_scored_positions": int(pb.mask.any(1).sum()), "scored_positions": int(pb.mask.sum()),
        "m_clean": round(att.m_clean, 4), "m_corrupt": round(att.m_corrupt, 4),
        "s_node_eap": round(float(att.nodes[0]), 4), "s_node_exact": round(float(exact_nodes[0]), 4),
        "n_nodes": len(g.upstream), "n_edges": g.n_edges, "n_edges_patched_exactly": int(v.sum()),
        "t_eapig_s": round(t_eap, 2), "t_eapig_repeat_s": round(t_eap2, 2),
        "t_exact_all_edges_s": round(t_edges, 1), "t_exact_all_nodes_s": round(t_nodes, 2),
        "ratio_edges": round(t_edges / t_eap, 1), "ratio_nodes": round(t_nodes / t_eap, 2),
        "spearman_all_edges": _rho(ex, est), "spearman_top100_edges": _top(ex, est, 100),
        "spearman_top20_edges": _top(ex, est, 20),
        "sign_agreement_top100_edges": round(float((torch.sign(ex) == torch.sign(est))[
            ex.abs().argsort(descending=True)[:100]].float().mean()), 3),
        "spearman_all_nodes": _rho(exact_nodes, att.nodes), "spearman_top20_nodes": _top(exact_nodes, att.nodes, 20),
        "spearman_top20_nodes_without_s": _top(exact_nodes[1:], att.nodes[1:], 20),
    }
    if a.check:
        flat = torch.where(v, exact.abs(), torch.full_like(exact, -1)).flatten().argsort(descending=True)
        rand = v.flatten().nonzero()[:, 0][torch.randperm(g.n_edges)]
        picks = (flat[: a.check - a.check // 2].tolist() + rand[: a.check // 2].tolist())[: a.check]
        full = torch.ones_like(v)
        m0 = C.patched_metric(lm, pb, vec, a.alpha, g, full)
        t0, diff = time.perf_counter(), 0.0
        for f in picks:
            keep = full.clone().flatten()
            keep[f] = False
            ref = float((m0 - C.patched_metric(lm, pb, vec, a.alpha, g, keep.view_as(full))).mean())
            diff = max(diff, abs(ref - float(exact.flatten()[f])))
        res["check_edges"] = len(picks)
        res["check_max_abs_diff_vs_unbatched"] = float(f"{diff:.3g}")
        res["check_max_abs_exact_effect"] = round(float(ex.abs().max()), 4)
        res["t_unbatched_per_edge_s"] = round((time.perf_counter() - t0) / max(len(picks), 1), 3)
    res["load_avg_1min_start_end"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    res["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
