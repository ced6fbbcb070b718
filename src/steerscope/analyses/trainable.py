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
:func:`trainable_steering` (one trainable vector at one site, per-row scale) is what NTP / PO training
(:mod:`steerscope.extract.trained`) adds; both paths add through :func:`scaled_add`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from steerscope.errors import SiteError
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.sites import Site
from steerscope.vector import Provenance, SteeringVector, Use


def scaled_add(x: torch.Tensor, v: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """x + scale * v in x's dtype, keeping the autograd graph (the one trainable addition).

    Args:
        x: activations [batch pos d_model].
        v: the vector [d_model] (typically a Parameter).
        scale: None (plain x + v), a float, or one per row [batch].

    Returns:
        [batch pos d_model].

    Example:
        >>> scaled_add(torch.zeros(2, 3, 4), torch.ones(4), torch.tensor([1.0, -1.0]))[:, 0, 0]
        tensor([ 1., -1.])
    """
    if scale is None:
        return x + v.to(x.dtype)
    s = scale if isinstance(scale, float) else scale.to(x.dtype)[:, None, None]
    return x + s * v.to(x.dtype)


@contextmanager
def trainable_steering(lm: LM, layer: int, v: torch.Tensor, scale: torch.Tensor | float = 1.0,
                       site: str = "resid_pre") -> Iterator[Call]:
    """Add ``scale * v`` at ``blocks.{layer}.{site}``, all positions, keeping the autograd graph.

    Args:
        lm: the model.
        layer: block index.
        v: [d_model], typically a Parameter with ``requires_grad``.
        scale: a float or per-row [batch] tensor (e.g. sign * alpha).
        site: where (default ``resid_pre``).

    Example:
        >>> with trainable_steering(lm, 12, v, torch.tensor([1.0, -1.0])):
        ...     loss = lm.model(**batch).logits.sum()   # gradients reach v
    """
    def fn(x: torch.Tensor, _c: Call) -> torch.Tensor:
        return scaled_add(x, v, scale)

    with attached(lm, {Site(layer, site): fn}) as call:
        yield call


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
        return scaled_add(x, s)
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
        prov = Provenance.for_model(lm, method="rl-bias", positions="all", args={"gated": self.gated, **provenance_args},
                                    use=Use(site="mlp_out", layers=list(self.layers), positions="all", alpha=1.0))
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

        targets = list(targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)  # type: ignore[arg-type]
        for p in lm.model.parameters():
            p.requires_grad_(False)
        seeded_lora(lambda: inject_adapter_in_model(cfg, lm.model), seed)
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


M = TypeVar("M")


def seeded_lora(inject: Callable[[], M], seed: int, adapter: str = "default") -> M:
    """Run ``inject`` (a PEFT call that adds LoRA layers) with the LoRA weights drawn from ``seed``.

    PEFT initialises LoRA from the global RNG; here its draws happen inside ``torch.random.fork_rng``
    (the global RNG is left as it was) and are then replaced by :func:`init_lora`'s, which are the
    values PEFT draws after ``torch.manual_seed(seed)`` -- adapters trained before keep their numbers.

    Args:
        inject: e.g. ``lambda: get_peft_model(model, config)``; returns the adapted model.
        seed: the initialisation seed.
        adapter: the adapter's name.

    Returns:
        What ``inject`` returns.

    Example:
        >>> model = seeded_lora(lambda: get_peft_model(lm.model, LoraConfig(r=8)), seed=0)
    """
    with torch.random.fork_rng(devices=[]):
        model = inject()
    init_lora(model, seed, adapter)  # type: ignore[arg-type]
    return model


@torch.no_grad()
def init_lora(model: torch.nn.Module, seed: int, adapter: str = "default") -> None:
    """PEFT's LoRA initialisation (kaiming-uniform A, zero B) from a generator seeded with ``seed``.

    Algorithm (the draws PEFT makes from the global RNG after ``torch.manual_seed(seed)``, replayed on a
    local generator): for each adapted layer in module order, ``nn.Linear``'s default init of A [r in],
    then of B [out r] (both discarded by PEFT), then ``kaiming_uniform_(A, a=sqrt(5))``; B = 0. The
    float32 draw is rounded through the base layer's dtype, as PEFT's cast to the base layer does.

    Args:
        model: a model with LoRA layers (``lora_A`` / ``lora_B`` module dicts).
        seed: the initialisation seed.
        adapter: the adapter's name.

    Example:
        >>> init_lora(peft_model, seed=0)
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        lora_a, lora_b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a or lora_b is None:
            continue
        a, b = lora_a[adapter].weight, lora_b[adapter].weight
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        torch.empty(a.shape).uniform_(generator=g)  # nn.Linear(in, r): its default init of A
        torch.empty(b.shape).uniform_(generator=g)  # nn.Linear(r, out): its default init of B
        new_a = torch.nn.init.kaiming_uniform_(torch.empty(a.shape), a=math.sqrt(5), generator=g)
        base: torch.Tensor = m.get_base_layer().weight if hasattr(m, "get_base_layer") else a  # type: ignore[operator]
        a.copy_(new_a.to(base.dtype) if base.dtype.is_floating_point else new_a)
        b.zero_()


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
