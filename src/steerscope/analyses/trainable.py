"""Trainable interventions: a steering bias after the MLP (optionally gated per token), and LoRA.

Algorithm (bias-only steering, Sinii et al., 2025, arXiv 2505.18706 / 2509.06608):
    1. For each chosen layer l, a vector s_l [d_model] (zero-initialised ``torch.nn.Parameter``)
       is added to what the MLP of block l writes to the residual stream (site ``mlp_out``), at
       every position, prompt and generated tokens alike -- the same as a ``down_proj`` bias.
    2. Optional adaptive per-token scaling: g_t = 1 + tanh(w_l · ĥ_t + b_l), where ĥ_t is the
       RMS-normalised residual entering the MLP (site ``resid_mid``); the added vector is
       g_t s_l. With w = 0, b = 0 it is plain steering (g = 1).
    3. All model weights stay frozen; only s (and w, b) receive gradients.
    4. The trained bias is exported as an ordinary :class:`~steerscope.vector.SteeringVector`
       at site ``mlp_out`` (the gate, if any, is not part of it).

:class:`LoRAPolicy` wraps a PEFT LoRA adapter behind the same interface, as the baseline.
Both are used by :mod:`steerscope.extract.rl` through ``parameters()`` and ``active()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from steerscope.errors import SiteError
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.sites import Site
from steerscope.vector import Provenance, SteeringVector


def gated_add(x: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None, w: torch.Tensor | None,
              b: torch.Tensor | None) -> torch.Tensor:
    """x + g ⊙ s with g = 1 + tanh(w·rms_norm(h) + b) per token, or x + s without a gate.

    Args:
        x: what the MLP writes [batch pos d_model].
        s: the bias [d_model].
        h: residual entering the MLP [batch pos d_model] (needed only with a gate).
        w, b: gate weights [d_model] and bias [] (None: no gate).

    Returns:
        [batch pos d_model].
    """
    if w is None:
        return x + s.to(x.dtype)
    assert h is not None and b is not None
    hn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    g = 1.0 + torch.tanh(hn @ w.to(h.dtype) + b)  # [batch pos]
    return x + g[..., None] * s.to(x.dtype)


class SteeringBias(torch.nn.Module):
    """Trainable steering vectors added after the MLP of ``layers`` (zero-initialised).

    Args:
        lm: the (frozen) model; it is not modified.
        layers: block indices, or ``"all"``.
        gate: ``True`` for the adaptive per-token scale g = 1 + tanh(w·ĥ + b).

    Example:
        >>> bias = SteeringBias(lm, [29])
        >>> with bias.active():
        ...     loss = lm.model(**batch).logits.sum()   # gradients reach bias.s["29"]
        >>> bias.vector()[29].shape
        torch.Size([576])
    """

    def __init__(self, lm: LM, layers: Sequence[int] | str, gate: bool = False) -> None:
        super().__init__()
        if layers == "all":
            layers = list(range(lm.n_layers))
        layers = [int(x) for x in layers]
        if not layers:
            raise SiteError("give at least one layer to train a steering bias at")
        for x in layers:
            Site(x, "mlp_out").check(lm.n_layers)
        self.lm = [lm]  # a list, so that the model is not registered as a submodule
        self.layers = sorted(set(layers))
        self.gated = bool(gate)
        dev = lm.device

        def zeros(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.zeros(shape, device=dev, dtype=torch.float32))

        self.s = torch.nn.ParameterDict({str(x): zeros(lm.d_model) for x in self.layers})
        if self.gated:
            self.w = torch.nn.ParameterDict({str(x): zeros(lm.d_model) for x in self.layers})
            self.b = torch.nn.ParameterDict({str(x): zeros() for x in self.layers})

    @property
    def n_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @contextmanager
    def active(self) -> Iterator[Call]:
        """Add the biases (through :func:`steerscope.hooks.attached`) for the block; removed on exit."""
        lm = self.lm[0]
        hooks: dict[str, object] = {}
        for x in self.layers:
            key = f"steerscope.gate_h.{x}"
            if self.gated:
                def grab(h: torch.Tensor, call: Call, key: str = key) -> None:
                    call.store[key] = h
                    return None

                hooks[f"blocks.{x}.resid_mid"] = grab

            def add(out: torch.Tensor, call: Call, x: int = x, key: str = key) -> torch.Tensor:
                if self.gated:
                    return gated_add(out, self.s[str(x)], call.store.get(key), self.w[str(x)], self.b[str(x)])
                return gated_add(out, self.s[str(x)], None, None, None)

            hooks[f"blocks.{x}.mlp_out"] = add
        with attached(lm, hooks) as call:  # type: ignore[arg-type]
            yield call

    def vector(self, **provenance_args: object) -> SteeringVector:
        """The biases as an ordinary ``mlp_out`` :class:`SteeringVector` (gate dropped)."""
        lm = self.lm[0]
        prov = Provenance.for_model(lm, method="rl-bias", positions="all",
                                    args={"gated": self.gated, **provenance_args})
        return SteeringVector({x: self.s[str(x)].detach().float().cpu() for x in self.layers}, "mlp_out", prov)


class LoRAPolicy(torch.nn.Module):
    """A PEFT LoRA adapter on ``lm`` (modified in place: use a model loaded for this purpose).

    The adapter is enabled only inside :meth:`active`. Only the LoRA matrices train.

    Args:
        lm: a model that only this policy uses.
        r: LoRA rank.
        alpha: LoRA scale numerator (scale = alpha / r).
        targets: module names to adapt (default: every linear map of attention and MLP).
    """

    def __init__(self, lm: LM, r: int = 8, alpha: float = 16.0, targets: Sequence[str] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)
        targets = list(targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)  # type: ignore[arg-type]
        for p in lm.model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(cfg, lm.model)
        self.lm = [lm]
        self.named = {n.replace(".", "/"): p for n, p in lm.model.named_parameters() if "lora_" in n}
        self.params = torch.nn.ParameterDict(self.named)
        for p in self.params.values():
            p.requires_grad_(True)
        self._set(False)

    def _set(self, on: bool) -> None:
        for m in self.lm[0].model.modules():
            if hasattr(m, "lora_A") and hasattr(m, "enable_adapters"):
                m.enable_adapters(on)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @contextmanager
    def active(self) -> Iterator[None]:
        """Enable the adapter for the block."""
        self._set(True)
        try:
            yield None
        finally:
            self._set(False)


@contextmanager
def frozen_except(model: torch.nn.Module, keep: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Turn off ``requires_grad`` on every model parameter not in ``keep``; restore the flags on exit."""
    keep_ids = {id(p) for p in keep}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            if id(p) not in keep_ids:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
