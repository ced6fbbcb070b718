"""Card section ``attribution``: EAP-IG of the steering vector (:func:`steerscope.circuits.eap_ig`).

Share of the effect through each path: the steering node's outgoing edge scores IE(s -> v),
grouped by receiver kind (head queries/keys, head values, MLP inputs, the logits directly),
divided by their sum (the steering node's IE), per prompt, so that each share is a ratio of sums
over prompts with a bootstrap interval (prompts resampled). ``completeness`` = IE(s) / (m_clean -
m_corrupt): IG's sum rule, 1 when the T-step integral is complete. Top heads by node IE with the logit lens of their
steering value vectors (:func:`steerscope.analyses.ov.lens_table`). The scores are stored for the circuit
and sparsity sections.
"""

from __future__ import annotations

import numpy as np

from steerscope import circuits as C
from steerscope.analyses import ov
from steerscope.explain import intervals
from steerscope.explain.behaviour import Behaviour
from steerscope.explain.context import Context
from steerscope.explain.records import AttributionRecord, Estimate, Head

PATHS = {"qk": ("q", "k"), "v": ("v",), "heads": ("q", "k", "v"), "mlp": ("mlp",), "direct": ("logits",)}


def per_prompt_paths(att: C.Attribution) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({path: IE(s -> receivers of the path) per prompt [n]}, IE(s) per prompt [n])."""
    kinds = np.array([rec.kind for rec in att.graph.receivers])
    rows = att.s_edges.double().numpy()
    return {p: rows[:, np.isin(kinds, ks)].sum(1) for p, ks in PATHS.items()}, rows.sum(1)


def shares(att: C.Attribution, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """IE(s -> receivers of each path) / IE(s), with a bootstrap interval over prompts; ``heads`` = qk + v."""
    num, den = per_prompt_paths(att)
    return {p: intervals.ratio_of_sums(num[p], den, n_boot, seed) for p in PATHS}


def section(ctx: Context, beh: Behaviour) -> AttributionRecord:
    """The ``attribution`` record (raises UnsupportedModelError for families EAP-IG does not cover)."""
    lm, st = ctx.lm, ctx.settings
    att = C.eap_ig(lm, beh.pb, ctx.vector, ctx.alpha, steps=st.ig_steps, batch_size=4)
    ctx.save("attribution", {"edges": att.edges, "nodes": att.nodes, "ie_vec": att.ie_vec,
                             "mean_grad": att.mean_grad})
    scores = {att.graph.upstream[i]: float(att.nodes[i]) for i in range(len(att.graph.upstream))}
    rows = ov.lens_table(lm, ctx.alpha * ctx.s, scores, n_heads=st.n_heads, k=st.lens_k)
    heads = [Head(str(r.node), r.node.to_dict(), r.score, r.norm, r.top.tokens, r.bottom.tokens) for r in rows]
    total = att.m_clean - att.m_corrupt
    return AttributionRecord(
        share=shares(att, st.n_boot, st.seed), s_node=float(att.nodes[0]), m_clean=att.m_clean,
        m_corrupt=att.m_corrupt, completeness=float(att.nodes[0]) / total if abs(total) > 1e-9 else float("nan"),
        n_edges=att.graph.n_edges, n_nodes=len(att.graph.upstream), top_heads=heads,
        top_nodes=[{"node": str(n), **n.to_dict(), "score": v} for n, v in att.top_nodes(10)],
        ig_steps=st.ig_steps, scored_positions=int(beh.pb.mask.sum()))
