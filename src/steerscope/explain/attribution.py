"""Card section ``attribution``: EAP-IG of the steering vector (:func:`steerscope.circuits.eap_ig`).

Share of the effect through each path: the steering node's outgoing edge scores IE(s -> v),
grouped by receiver kind (head queries/keys, head values, MLP inputs, the logits directly),
divided by their sum (the steering node's IE). Top heads by node IE with the logit lens of their
steering value vectors (:func:`steerscope.ov.lens_table`). The scores are stored for the circuit
and sparsity sections.
"""

from __future__ import annotations

from typing import Any

from steerscope import circuits as C
from steerscope import ov
from steerscope.explain.behaviour import Behaviour
from steerscope.explain.context import Context

PATHS = {"q": "qk", "k": "qk", "v": "v", "mlp": "mlp", "logits": "direct"}  # receiver kind -> path


def shares(att: C.Attribution) -> dict[str, float]:
    """IE(s -> receivers of each kind) / IE(s); ``heads`` = qk + v."""
    row = att.edges[0]
    tot = float(row.sum())
    out = {k: 0.0 for k in ("qk", "v", "mlp", "direct")}
    for j, rec in enumerate(att.graph.receivers):
        out[PATHS[rec.kind]] += float(row[j])
    out = {k: v / tot if abs(tot) > 1e-12 else float("nan") for k, v in out.items()}
    out["heads"] = out["qk"] + out["v"]
    return out


def section(ctx: Context, beh: Behaviour) -> dict[str, Any]:
    """The ``attribution`` record (raises UnsupportedModelError for families EAP-IG does not cover)."""
    lm, st = ctx.lm, ctx.settings
    att = C.eap_ig(lm, beh.pb, ctx.vector, ctx.alpha, steps=st.ig_steps, batch_size=4)
    ctx.save("attribution", {"edges": att.edges, "nodes": att.nodes, "ie_vec": att.ie_vec,
                             "mean_grad": att.mean_grad})
    scores = {att.graph.upstream[i]: float(att.nodes[i]) for i in range(len(att.graph.upstream))}
    rows = ov.lens_table(lm, ctx.alpha * ctx.s, scores, n_heads=st.n_heads, k=st.lens_k)
    heads = [{"head": str(r.node), "node": r.node.to_dict(), "score": r.score, "svv_norm": r.norm,
              "svv_top": r.top.tokens, "svv_bottom": r.bottom.tokens} for r in rows]
    return {"share": shares(att), "s_node": float(att.nodes[0]), "m_clean": att.m_clean,
            "m_corrupt": att.m_corrupt, "n_edges": att.graph.n_edges, "n_nodes": len(att.graph.upstream),
            "top_heads": heads, "top_nodes": [{"node": str(n), **n.to_dict(), "score": v} for n, v in att.top_nodes(10)], "ig_steps": st.ig_steps,
            "scored_positions": int(beh.pb.mask.sum())}
