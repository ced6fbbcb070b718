"""The attribution cluster: what a steering vector does, edge by edge (paper A, §4).

* :mod:`.graph` — typed :class:`Node` / :class:`Receiver` records, the :class:`Graph` and its
  pruning / circuit selection (data, kept apart from the algorithms);
* :mod:`.batch` — teacher-forced :class:`PatchBatch` (prepare, trim, rows, metric);
* :mod:`.eap_ig` — multi-token EAP-IG (edge, node and dimension-level scores);
* :mod:`.exact` — exact, batched edge and node patching;
* :mod:`.faithfulness` — edge-level patched runs and circuit faithfulness;
* :mod:`.nodes`, :mod:`.probes`, :mod:`.weights` — node writes, receiver gradients, per-head weights;
  ``_suffix`` / ``_vjp`` are internals (one prefix, many suffixes; closed-form norm VJPs).

Example:
    >>> from steerscope import circuits as C
    >>> pb = C.prepare(lm, prompts, vec, -1.0)
    >>> att = C.eap_ig(lm, pb, vec, -1.0)
    >>> C.faithfulness_curve(lm, pb, vec, -1.0, att.edges, att.graph, [50, 100]).minimal()
"""

from steerscope.circuits.batch import (
    PatchBatch,
    forward,
    inputs,
    metric,
    prepare,
    scored_batches,
    trim,
    trim_columns,
)
from steerscope.circuits.eap_ig import (
    Attribution,
    check_supported,
    default_pass_budget,
    eap_ig,
    mean_gradient,
    receiver_grads,
)
from steerscope.circuits.exact import POINTS, edge_effects, node_effects, node_site, receiver_site
from steerscope.circuits.faithfulness import (
    Faithfulness,
    faithfulness_curve,
    faithfulness_of,
    node_patching,
    patched_metric,
    patched_per_prompt,
)
from steerscope.circuits.graph import Graph, Node, Receiver, greedy_circuit, overlap, prune, random_circuit
from steerscope.circuits.nodes import head_outputs, model_graph, node_values
from steerscope.generation import position_ids  # the circuits API has always offered it

__all__ = [
    "POINTS", "Attribution", "Faithfulness", "Graph", "Node", "PatchBatch", "Receiver", "check_supported",
    "default_pass_budget", "eap_ig", "edge_effects", "faithfulness_curve", "faithfulness_of", "forward",
    "greedy_circuit", "head_outputs", "model_graph", "inputs", "mean_gradient", "metric", "node_effects", "node_patching", "node_site",
    "node_values", "overlap", "patched_metric", "patched_per_prompt", "position_ids", "prepare", "prune", "random_circuit",
    "receiver_grads", "receiver_site", "scored_batches", "trim", "trim_columns",
]
