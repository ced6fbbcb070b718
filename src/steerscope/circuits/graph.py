"""The attribution graph of a steering vector: typed nodes and receivers, edges, and pruning.

The graph is data, kept apart from the algorithms that score it (EAP-IG, :mod:`.eap_ig`) and
patch it (:mod:`.exact`, :mod:`.faithfulness`), as circuit-tracer's ``graph.py`` does. Nodes and
receivers are index records (:class:`Node`, :class:`Receiver`); their order, the GQA grouping and
which edges exist are decided here and nowhere else:

  * upstream nodes, in order: the steering node s, then per layer l >= l0 its heads 0..H-1 and
    its MLP;
  * receivers, in order: per layer its query heads (q), its kv heads' k then v inputs, its MLP
    input, and finally the logits;
  * an edge u -> v exists when u writes into the residual stream before v reads it (with a
    parallel residual, GPT-NeoX, a block's MLP reads the block's input, so its heads do not
    feed it).

Circuits (:func:`greedy_circuit`, :func:`prune`, :func:`random_circuit`, :func:`overlap`) are
bool [U V] edge masks over one :class:`Graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch

NodeKind = Literal["steer", "head", "mlp"]
ReceiverKind = Literal["q", "k", "v", "mlp", "logits"]
_NODE_KINDS = ("steer", "head", "mlp")
_RECEIVER_KINDS = ("q", "k", "v", "mlp", "logits")


@dataclass(frozen=True, order=True)
class Node:
    """An upstream node: the steering node (``kind="steer"``), one attention head, or one MLP.

    ``layer`` is the block it writes in (the steering node: the block whose input it changes);
    ``head`` is the query head (heads only). ``str(node)`` is a display name only (``"s"``,
    ``"L14.H3"``, ``"L14.MLP"``): code never parses it; JSON stores :meth:`to_dict`.

    Example:
        >>> Node.attn_head(14, 3), Node.from_dict({"kind": "mlp", "layer": 2, "head": None})
    """

    kind: NodeKind
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _NODE_KINDS or (self.head is None) != (self.kind != "head"):
            raise ValueError(f"invalid node {self.kind!r} layer {self.layer} head {self.head}")

    @classmethod
    def steer(cls, layer: int) -> Node:
        return cls("steer", layer)

    @classmethod
    def attn_head(cls, layer: int, head: int) -> Node:
        return cls("head", layer, head)

    @classmethod
    def mlp(cls, layer: int) -> Node:
        return cls("mlp", layer)

    @property
    def order(self) -> float:
        """Where the node writes into the stream (comparable with :meth:`Receiver.read_order`)."""
        return 2 * self.layer - 0.5 if self.kind == "steer" else 2 * self.layer + (self.kind == "mlp")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "head": self.head}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Node:
        return cls(d["kind"], int(d["layer"]), None if d.get("head") is None else int(d["head"]))

    def __str__(self) -> str:
        if self.kind == "steer":
            return "s"
        return f"L{self.layer}.H{self.head}" if self.kind == "head" else f"L{self.layer}.MLP"


@dataclass(frozen=True, order=True)
class Receiver:
    """Where a node's write is read: a head's q, a kv head's k or v, an MLP input, or the logits.

    ``head`` is the query head (q) or the kv head (k, v); None for the MLP and the logits.
    ``layer`` is the block that reads (the logits: ``n_layers``).

    Example:
        >>> Receiver(3, "k", 1), str(Receiver(3, "k", 1))
        (Receiver(layer=3, kind='k', head=1), 'L3.KV1.k')
    """

    layer: int
    kind: ReceiverKind
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _RECEIVER_KINDS or (self.head is None) != (self.kind in ("mlp", "logits")):
            raise ValueError(f"invalid receiver {self.kind!r} layer {self.layer} head {self.head}")

    def read_order(self, parallel: bool = False) -> float:
        """Where the receiver reads the stream (comparable with :attr:`Node.order`)."""
        if self.kind == "logits":
            return float("inf")
        return 2 * self.layer + (self.kind == "mlp" and not parallel)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "head": self.head}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Receiver:
        return cls(int(d["layer"]), d["kind"], None if d.get("head") is None else int(d["head"]))

    def __str__(self) -> str:
        if self.kind == "logits":
            return "logits"
        if self.kind == "mlp":
            return f"L{self.layer}.MLP"
        return f"L{self.layer}.H{self.head}.q" if self.kind == "q" else f"L{self.layer}.KV{self.head}.{self.kind}"


def layer_nodes(layer: int, n_heads: int) -> list[Node]:
    """The nodes of one block, in graph order: heads 0..H-1, then the MLP."""
    return [Node.attn_head(layer, h) for h in range(n_heads)] + [Node.mlp(layer)]


def layer_receivers(layer: int, n_heads: int, n_kv: int) -> list[Receiver]:
    """The receivers of one block, in graph order: q per head, k per kv head, v per kv head, MLP."""
    return ([Receiver(layer, "q", h) for h in range(n_heads)] + [Receiver(layer, "k", g) for g in range(n_kv)]
            + [Receiver(layer, "v", g) for g in range(n_kv)] + [Receiver(layer, "mlp")])


@dataclass(frozen=True, eq=False)
class Graph:
    """Nodes, receivers and edges of the attribution graph from layer ``layer0`` up.

    ``upstream[i]`` is a :class:`Node`, ``receivers[j]`` a :class:`Receiver`; ``valid[i, j]``
    says whether the edge exists. :meth:`index` and :meth:`receiver_index` map records back.
    ``parallel``: attention and MLP of a block read the same stream (GPT-NeoX).

    Example:
        >>> g = Graph.build(12, lm.n_layers, lm.n_heads, lm.n_kv_heads)
        >>> g.upstream[g.index(Node.attn_head(14, 3))]
    """

    layer0: int
    n_layers: int
    n_heads: int
    n_kv: int
    upstream: tuple[Node, ...]
    receivers: tuple[Receiver, ...]
    valid: torch.Tensor = field(repr=False)  # bool [U V]
    parallel: bool = False

    @classmethod
    def build(cls, layer0: int, n_layers: int, n_heads: int, n_kv: int, parallel: bool = False) -> Graph:
        ups = [Node.steer(layer0)]
        recv: list[Receiver] = []
        for layer in range(layer0, n_layers):
            ups += layer_nodes(layer, n_heads)
            recv += layer_receivers(layer, n_heads, n_kv)
        recv.append(Receiver(n_layers, "logits"))
        reads = torch.tensor([r.read_order(parallel) for r in recv])
        valid = torch.tensor([u.order for u in ups])[:, None] < reads[None, :]
        return cls(layer0, n_layers, n_heads, n_kv, tuple(ups), tuple(recv), valid, parallel)

    def read_order(self, j: int) -> float:
        """Where receiver ``j`` reads the stream (comparable with :attr:`Node.order`)."""
        return self.receivers[j].read_order(self.parallel)

    def to_dict(self) -> dict[str, Any]:
        """The facts :meth:`build` needs (JSON-ready); :meth:`from_dict` rebuilds the graph."""
        return {"layer0": self.layer0, "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv": self.n_kv,
                "parallel": self.parallel}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Graph:
        return cls.build(int(d["layer0"]), int(d["n_layers"]), int(d["n_heads"]), int(d["n_kv"]),
                         bool(d.get("parallel", False)))

    @cached_property
    def _node_ids(self) -> dict[Node, int]:
        return {n: i for i, n in enumerate(self.upstream)}

    @cached_property
    def _receiver_ids(self) -> dict[Receiver, int]:
        return {r: j for j, r in enumerate(self.receivers)}

    def index(self, node: Node) -> int:
        """Row of ``node`` in every [U ...] tensor of this graph."""
        return self._node_ids[node]

    def receiver_index(self, receiver: Receiver) -> int:
        """Column of ``receiver`` in every [... V] tensor of this graph."""
        return self._receiver_ids[receiver]

    def receiver_columns(self, layer: int, kind: ReceiverKind) -> list[int]:
        """Columns of the receivers of ``kind`` in block ``layer``, in head order."""
        return [j for j, r in enumerate(self.receivers) if r.layer == layer and r.kind == kind]

    def node_rows(self, layer: int) -> list[int]:
        """Rows of block ``layer``'s nodes (its heads, then its MLP)."""
        return [i for i, n in enumerate(self.upstream) if n.layer == layer and n.kind != "steer"]

    def kv_group(self, head: int) -> int:
        """The kv head a query head reads its keys and values from (GQA)."""
        return head // (self.n_heads // self.n_kv)

    def fed(self, receiver: Receiver) -> list[Node]:
        """The nodes whose output a receiver's input feeds (a kv head's k or v feeds its query group)."""
        if receiver.kind in ("logits", "mlp"):
            return [] if receiver.kind == "logits" else [Node.mlp(receiver.layer)]
        if receiver.kind == "q":
            return [Node.attn_head(receiver.layer, int(receiver.head or 0))]
        return [Node.attn_head(receiver.layer, h) for h in range(self.n_heads) if self.kv_group(h) == receiver.head]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


def _reach(start: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Closure of ``start`` [U] under ``x -> x | (x @ step > 0)`` ([U U])."""
    cur = start.clone()
    for _ in range(len(cur)):
        new = cur | (cur.float() @ step.float() > 0)
        if torch.equal(new, cur):
            break
        cur = new
    return cur


def prune(keep: torch.Tensor, graph: Graph) -> torch.Tensor:
    """Keep only edges on a path s -> ... -> logits. keep: bool [U V] -> bool [U V].

    Receivers map to upstream nodes through :meth:`Graph.fed` (a head's q/k/v input feeds that
    head; a kv head's inputs feed its query group; an MLP input feeds that MLP).

    Example:
        >>> prune(greedy_edges, graph).sum() <= greedy_edges.sum()
    """
    keep = keep.bool() & graph.valid
    U, V = keep.shape
    feeds = torch.zeros(V, U, dtype=torch.bool)  # receiver -> the upstream node(s) it feeds
    for j, r in enumerate(graph.receivers):
        for n in graph.fed(r):
            feeds[j, graph.index(n)] = True
    adj = (keep.float() @ feeds.float()) > 0  # u -> u' through any kept receiver of u' [U U]
    start = torch.zeros(U, dtype=torch.bool)
    start[graph.index(Node.steer(graph.layer0))] = True
    fwd = _reach(start, adj)  # reachable from s
    logits = graph.receiver_index(Receiver(graph.n_layers, "logits"))
    bwd = _reach(keep[:, logits].clone(), adj.T)  # reaches the logits
    dst_ok = (feeds & bwd[None, :]).any(1)
    dst_ok[logits] = True
    return keep & fwd[:, None] & dst_ok[None, :]


def greedy_circuit(scores: torch.Tensor, graph: Graph, n: int) -> torch.Tensor:
    """Top-n edges by |score| ([U V]), pruned to paths from s to the logits. bool [U V].

    Example:
        >>> circuit = greedy_circuit(att.edges, att.graph, 200)
    """
    flat = torch.where(graph.valid, scores.abs(), torch.full_like(scores, -1.0)).flatten()
    n = min(n, graph.n_edges)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(n).indices] = True
    return prune(keep.view_as(scores), graph)


def random_circuit(graph: Graph, n: int, seed: int = 0) -> torch.Tensor:
    """n random valid edges (a control; not pruned). bool [U V]."""
    g = torch.Generator().manual_seed(seed)
    idx = graph.valid.flatten().nonzero()[:, 0]
    pick = idx[torch.randperm(len(idx), generator=g)[: min(n, len(idx))]]
    keep = torch.zeros(graph.valid.numel(), dtype=torch.bool)
    keep[pick] = True
    return keep.view_as(graph.valid)


def overlap(c1: torch.Tensor, c2: torch.Tensor) -> float:
    """|C1 ∩ C2| / min(|C1|, |C2|) of two edge sets (bool [U V])."""
    a, b = int(c1.sum()), int(c2.sum())
    return float((c1 & c2).sum()) / max(min(a, b), 1)
