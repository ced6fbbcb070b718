"""EAP-IG versus exact activation patching on the same nodes and edges: time ratio and agreement.

Usage:
    python benchmarks/bench_eapig.py [--model smollm2-135m-safe] [--vector smollm2-135m-safe/refusal-dim]
        [--alpha -1] [--n 4] [--tokens 16] [--edges 40]

Exact node patching runs one forward per node (all nodes); exact edge patching runs one forward
per edge on the ``--edges`` edges with the largest |EAP-IG score| and is extrapolated to every
edge of the graph for the time ratio (the correlation is measured on those edges).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from scipy.stats import spearmanr

import steerscope as ss
from steerscope import attribution as A
from steerscope import circuits as C
from steerscope.data import data_path, read_jsonl


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-safe")
    ap.add_argument("--vector", default="smollm2-135m-safe/refusal-dim")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=-1.0)
    ap.add_argument("--prompts", default="harmful", choices=["harmful", "harmless"])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--edges", type=int, default=40)
    ap.add_argument("--top", type=int, default=20, help="top nodes (by exact |IE|) for the rank correlation")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = ss.load_model(a.model)
    vec = ss.SteeringVector.load(a.vector)
    vec = vec.select([a.layer if a.layer is not None else vec.layers[0]])
    prompts = [r["instruction"] for r in read_jsonl(data_path("refusal", f"{a.prompts}.jsonl"))][300 : 300 + a.n]
    pb = A.prepare(lm, prompts, vec, a.alpha, max_new_tokens=a.tokens)
    t0 = time.perf_counter()
    att = A.eap_ig(lm, pb, vec, a.alpha, steps=10, batch_size=a.n)
    t_eap = time.perf_counter() - t0
    g = att.graph
    t0 = time.perf_counter()
    exact = C.node_patching(lm, pb, vec, a.alpha, g)
    t_nodes = time.perf_counter() - t0
    top = exact.abs().argsort(descending=True)[: a.top]
    rho_nodes = float(spearmanr(exact[top].numpy(), att.nodes[top].numpy()).statistic)
    rho_all = float(spearmanr(exact.numpy(), att.nodes.numpy()).statistic)
    corr = A.node_values(lm, pb, vec, 0.0)
    full = torch.ones_like(g.valid)
    m0 = C.patched_metric(lm, pb, vec, a.alpha, g, full, corr).mean()
    flat = torch.where(g.valid, att.edges.abs(), torch.full_like(att.edges, -1)).flatten().argsort(descending=True)
    ex_e, est_e = [], []
    t0 = time.perf_counter()
    for f in flat[: a.edges].tolist():
        keep = full.clone().flatten()
        keep[f] = False
        ex_e.append(float(m0 - C.patched_metric(lm, pb, vec, a.alpha, g, keep.view_as(full), corr).mean()))
        est_e.append(float(att.edges.flatten()[f]))
    t_edges = (time.perf_counter() - t0) / max(a.edges, 1) * g.n_edges
    res = {
        "model": a.model, "vector": a.vector, "alpha": a.alpha, "n_prompts": a.n, "tokens": a.tokens,
        "scored_positions": int(pb.mask.sum()), "m_clean": att.m_clean, "m_corrupt": att.m_corrupt,
        "s_node_eap": float(att.nodes[0]), "s_node_exact": float(exact[0]),
        "n_nodes": len(g.upstream), "n_edges": g.n_edges,
        "t_eapig_s": round(t_eap, 2), "t_exact_nodes_s": round(t_nodes, 2),
        "t_exact_edges_extrapolated_s": round(t_edges, 1),
        "ratio_nodes": round(t_nodes / t_eap, 2), "ratio_edges": round(t_edges / t_eap, 1),
        f"spearman_top{a.top}_nodes": round(rho_nodes, 3), "spearman_all_nodes": round(rho_all, 3),
        f"spearman_top{a.edges}_edges": round(float(spearmanr(ex_e, est_e).statistic), 3),
    }
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
