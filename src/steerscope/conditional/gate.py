"""How gates act inside a forward pass: a per-row 0/1 multiplier on alpha, computed in the forward.

1. Each :class:`~steerscope.conditional.condition.Condition` leaf gets a read-only hook at ``resid_pre`` of its
   layer. It projects the residual (:meth:`Condition.project`), reduces over the real tokens (:func:`reduce_prompt`
   or, per position, :func:`reduce_running`) and stores a bool decision [batch 1] (``on="prompt"``) or
   [batch pos] (``on="token"``). Prompt decisions are made at the call that starts a sequence
   (:attr:`steerscope.hooks.Call.is_prefill`) and kept for its later calls, cached or cache-free.
2. The intervention's hooks (at layers >= every leaf's layer, so the leaves read an unsteered residual)
   ask :meth:`GateState.weights` for one float weight per rule [batch pos] and multiply their deltas by it:
   no Python branch per row, and a shut row gets ``x + 0`` (bit-identical to unsteered).
3. Rules ``[(gate, ...), ...]`` resolve conflicts by *first match wins*: rule i acts on a row/position when
   its gate is open and no earlier rule's is (a ``None`` gate is always open: an ``else`` rule).

Example:
    >>> state = GateState(lm, [harmful, None])
    >>> hooks = state.hooks()  # {Site(6, "resid_pre"): [read]}; then weights(call, b, n) in your own hook
"""

from __future__ import annotations

from typing import Sequence

import torch

from steerscope.conditional.condition import Condition, Gate, unique_leaves
from steerscope.errors import ConditionError
from steerscope.hooks import Call, HookFn
from steerscope.models.lm import LM
from steerscope.sites import Site

Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # running sum, count, max per row [batch]


def reduce_prompt(p: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce projections p [batch pos] over the real tokens (``mask`` bool [batch pos]) to [batch].

    ``last`` is the last real column of each row (left or right padding); a row without real tokens gets -inf.

    Example:
        >>> reduce_prompt(torch.tensor([[9., 1., 3.]]), torch.tensor([[False, True, True]]), "mean")
        tensor([2.])
    """
    ninf = torch.full_like(p, -torch.inf)
    n = mask.sum(1)
    if how == "mean":
        out = torch.where(mask, p, torch.zeros_like(p)).sum(1) / n.clamp(min=1)
    elif how == "max":
        out = torch.where(mask, p, ninf).max(1).values
    else:
        cols = torch.arange(p.shape[1], device=p.device)
        last = torch.where(mask, cols, torch.full_like(cols, -1)).max(1).values.clamp(min=0)
        out = p.gather(1, last[:, None])[:, 0]
    return torch.where(n > 0, out, torch.full_like(out, -torch.inf))


def reduce_running(p: torch.Tensor, mask: torch.Tensor, how: str, carry: Carry | None) -> tuple[torch.Tensor, Carry]:
    """Per-position scores [batch pos]: the reduction over the real tokens up to and including each position,
    continuing ``carry`` (the state after the previous call's last position; None: a fresh sequence).

    Example:
        >>> s, _ = reduce_running(torch.tensor([[1., 3.]]), torch.ones(1, 2, dtype=torch.bool), "mean", None)
        >>> s
        tensor([[1., 2.]])
    """
    b = p.shape[0]
    zero = torch.zeros(b, device=p.device)
    s0, n0, m0 = carry if carry is not None else (zero, zero, torch.full_like(zero, -torch.inf))
    mf = mask.float()
    sums = s0[:, None] + torch.cumsum(torch.where(mask, p, torch.zeros_like(p)), 1)
    counts = n0[:, None] + torch.cumsum(mf, 1)
    maxes = torch.maximum(m0[:, None], torch.cummax(torch.where(mask, p, torch.full_like(p, -torch.inf)), 1).values)
    if how == "mean":
        scores = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(p, -torch.inf))
    elif how == "max":
        scores = maxes
    else:
        scores = torch.where(mask, p, torch.full_like(p, -torch.inf))
    return scores, (sums[:, -1], counts[:, -1], maxes[:, -1])


class GateState:
    """The gates of one intervention context: leaf read hooks and the per-rule weights (module docstring).

    Args:
        lm: the model (each leaf is checked against it).
        gates: one gate per rule; None is always open.
        first_layer: the lowest layer the intervention writes at; every leaf must read at or below it.
    """

    def __init__(self, lm: LM, gates: Sequence[Gate | None], first_layer: int) -> None:
        self.gates = list(gates)
        self.leaves = unique_leaves([g for g in self.gates if g is not None])
        for leaf in self.leaves:
            leaf.check(lm)
            if leaf.layer > first_layer:
                raise ConditionError(f"a condition reads layer {leaf.layer} but steering starts at layer {first_layer}; "
                                     "the gate must read an unsteered residual: use a condition layer <= the "
                                     "steering layers")
        self.prompt: dict[int, torch.Tensor] = {}  # leaf id -> bool [batch 1], kept from the prefill
        self.carry: dict[int, Carry] = {}
        self.now: dict[int, tuple[int, torch.Tensor]] = {}  # leaf id -> (call index, decision)

    def hooks(self) -> dict[Site, list[HookFn]]:
        """The leaves' read-only hooks (register them before the intervention's own, same site first)."""
        out: dict[Site, list[HookFn]] = {}
        for leaf in self.leaves:
            out.setdefault(Site(leaf.layer, "resid_pre"), []).append(self._reader(leaf))
        return out

    def _reader(self, leaf: Condition) -> HookFn:
        key = id(leaf)

        def read(x: torch.Tensor, call: Call) -> None:
            p, mask = leaf.project(x), call.new_mask().bool()
            if leaf.on == "prompt":
                if call.is_prefill:
                    self.prompt[key] = (reduce_prompt(p, mask, leaf.reduce) > leaf.threshold)[:, None]
                decided = self.prompt.get(key)
                if decided is None or decided.shape[0] != x.shape[0]:
                    raise ConditionError("a prompt condition needs the call that starts the sequence inside the "
                                         "context; enter it before generating (not mid-generation)")
            else:
                scores, self.carry[key] = reduce_running(p, mask, leaf.reduce,
                                                         self.carry.get(key) if call.past > 0 else None)
                decided = scores > leaf.threshold
            self.now[key] = (call.index, decided)
        return read

    def weights(self, call: Call, batch: int, pos: int) -> list[torch.Tensor]:
        """One float weight [batch pos] per rule: 1 where the rule acts (first match wins), else 0."""
        values = {}
        for key, (index, decided) in self.now.items():
            if index == call.index:
                values[key] = decided
        missing = [leaf.layer for leaf in self.leaves if id(leaf) not in values]
        if missing:
            raise ConditionError(f"the condition at layer(s) {missing} was not read in this forward pass")
        device = call.mask.device if call.mask is not None else None
        taken = torch.zeros(batch, pos, dtype=torch.bool, device=device)
        out = []
        for g in self.gates:
            opened = torch.ones_like(taken) if g is None else g.open(values).expand(batch, pos)
            out.append((opened & ~taken).float())
            taken = taken | opened
        return out
