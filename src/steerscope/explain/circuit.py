"""Card section ``circuit``: the minimal faithful circuit of the steering effect (paper A, §4).

Faithfulness of greedy top-n circuits (exact edge-level patching, :mod:`steerscope.circuits`) on
a grid of edge fractions; the smallest grid size reaching the threshold (0.85) is refined by
bisection between grid points; controls: the complement of the minimal circuit and two random
circuits of twice its size. The minimal circuit's faithfulness gets a 95 % bootstrap interval over
prompts (per-prompt patched metrics, a ratio of means). The refusal-mechanisms study uses :func:`minimal_circuit` and
:func:`controls` for its circuits too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from steerscope import circuits as C
from steerscope.analyses.records import Record
from steerscope.explain import intervals
from steerscope.explain.behaviour import Behaviour
from steerscope.explain.context import Context
from steerscope.explain.records import CircuitRecord, MinimalCircuit
from steerscope.models.load import LM
from steerscope.vector import SteeringVector


@dataclass(frozen=True)
class CircuitControls(Record):
    """:func:`controls`' result: the circuit's size and the faithfulness of its controls."""

    own_size: int
    random_2x: list[float]  # two random circuits of twice the size
    complement: float
    others: list[float]  # the ``others`` circuits, in order


def graph_of(lm: LM, vector: SteeringVector) -> C.Graph:
    return C.model_graph(lm, vector.layers[0])


def minimal_circuit(lm: LM, pb: C.PatchBatch, vector: SteeringVector, alpha: float, edges: torch.Tensor,
                    fracs: Sequence[float], threshold: float = 0.85, bisect_steps: int = 4
                    ) -> tuple[MinimalCircuit, torch.Tensor]:
    """Faithfulness curve and the minimal faithful circuit (bool [U V]).

    Example:
        >>> rec, circ = minimal_circuit(lm, pb, vec, 4.0, att.edges, (0.01, 0.05, 0.2))
    """
    g = graph_of(lm, vector)
    sizes = sorted({max(1, int(round(f * g.n_edges))) for f in fracs})
    fc = C.faithfulness_curve(lm, pb, vector, alpha, edges, g, sizes)
    reached = any(f >= threshold for f in fc.values)
    minimal = next((n for n, f in zip(sizes, fc.values) if f >= threshold), sizes[-1])
    i = sizes.index(minimal)
    lo, hi = (sizes[i - 1] if i > 0 else 0), minimal
    for _ in range(bisect_steps if reached else 0):  # refine between grid points
        if hi - lo <= max(1, hi // 50):
            break
        mid = (lo + hi) // 2
        (f_mid,), _, _ = C.faithfulness_of(lm, pb, vector, alpha, g, [C.greedy_circuit(edges, g, mid)])
        lo, hi = (lo, mid) if f_mid >= threshold else (mid, hi)
    circ = C.greedy_circuit(edges, g, hi)
    rec = MinimalCircuit(sizes, list(fc.n_edges), list(fc.values), fc.m_full, fc.m_empty, g.n_edges, hi,
                         int(circ.sum()), int(circ.sum()) / g.n_edges, reached, threshold, edge_kinds(circ, g),
                         g.to_dict())
    return rec, circ


def edge_kinds(circ: torch.Tensor, g: C.Graph) -> dict[str, int]:
    """Edges of a circuit by receiver: q, k, v, mlp, logits."""
    kinds: dict[str, int] = {"q": 0, "k": 0, "v": 0, "mlp": 0, "logits": 0}
    for j in circ.any(0).nonzero()[:, 0].tolist():
        kinds[g.receivers[j].kind] += int(circ[:, j].sum())
    return kinds


def controls(lm: LM, pb: C.PatchBatch, vector: SteeringVector, alpha: float, circ: torch.Tensor, seed: int = 0,
             others: Sequence[torch.Tensor] = ()) -> CircuitControls:
    """Faithfulness of two random circuits of twice the size, the complement, and ``others``."""
    g = graph_of(lm, vector)
    size = int(circ.sum())
    tests = [C.random_circuit(g, 2 * size, seed=seed + i) for i in range(2)] + [g.valid & ~circ] + list(others)
    vals, _, _ = C.faithfulness_of(lm, pb, vector, alpha, g, tests)
    return CircuitControls(size, list(vals[:2]), vals[2], list(vals[3:]))


def section(ctx: Context, beh: Behaviour) -> CircuitRecord:
    """The ``circuit`` record (needs the attribution section's scores): the minimal circuit, its
    faithfulness with a bootstrap interval over prompts, and its controls (one patching pass)."""
    st = ctx.settings
    edges = ctx.load("attribution")["edges"]
    rec, circ = minimal_circuit(ctx.lm, beh.pb, ctx.vector, ctx.alpha, edges, st.circuit_fracs, st.threshold,
                                st.bisect_steps)
    g = graph_of(ctx.lm, ctx.vector)
    size = int(circ.sum())
    tests = [C.random_circuit(g, 2 * size, seed=st.seed + i) for i in range(2)] + [g.valid & ~circ, circ]
    m = C.patched_per_prompt(ctx.lm, beh.pb, ctx.vector, ctx.alpha, g, tests).numpy()
    ctl = [intervals.ratio(m[2 + j], m[0], m[1], st.n_boot, st.seed) for j in range(len(tests))]
    return CircuitRecord(edge_fraction=rec.minimal_fraction, **rec.fields(), complement=ctl[2].value,
                         random_2x=[ctl[0].value, ctl[1].value], faithfulness_minimal=ctl[3])
