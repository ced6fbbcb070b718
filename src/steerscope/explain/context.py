"""What every section of the mechanism card shares: the model, the one-layer vector, its scale,
the prompts, the settings, the scorer and the run folder (records and tensors)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from steerscope.models.load import LM
from steerscope.runs import MemoryRun, Run
from steerscope.vector import SteeringVector

ScoreFn = Callable[[Sequence[str]], Any]  # texts -> [n] scores (higher = more of the behaviour)


@dataclass(frozen=True)
class Settings:
    """Sizes of every section (``Settings.quick()`` for the fast card).

    ``dose_factors`` multiply a given alpha; without one, ``dose_scales`` set |alpha v| as a
    fraction of the mean residual norm at the layer.
    """

    n_tokens: int = 24  # steered greedy response length (teacher-forced)
    ig_steps: int = 10  # EAP-IG midpoint steps T
    dose_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    dose_scales: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    kl_budget: float = 1.0  # nats
    kl_quantile: float = 0.95  # the worst 5 % of positions
    n_neutral: int = 16  # neutral prompts for the KL
    circuit_fracs: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    threshold: float = 0.85
    bisect_steps: int = 4
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
    sparsity_target: float = 0.9
    bisect_sparsity: int = 4
    perp_seeds: tuple[int, ...] = (0, 1, 2)
    equivalence_margin: float = 0.2  # of the effect (paper C's |d| < 0.2)
    n_boot: int = 1000
    n_cov_prompts: int = 40
    lens_k: int = 10
    n_heads: int = 5
    gen_tokens: int = 24
    batch_size: int = 8
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        """Small sizes for a quick card (target: about two minutes on two idle CPU cores; timings in docs/explain.md)."""
        return cls(n_tokens=12, ig_steps=3, dose_factors=(0.5, 1.0, 2.0), dose_scales=(0.25, 0.5, 1.0),
                   n_neutral=8, circuit_fracs=(0.01, 0.05, 0.2), bisect_steps=0, sparsities=(0.5, 0.9, 0.99),
                   bisect_sparsity=2, perp_seeds=(0, 1), n_boot=1000, n_cov_prompts=16, gen_tokens=12)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Context:
    """Shared state of one card. ``vector`` is one-layer (resid_pre) at ``layer``; ``s = vector[layer]``."""

    lm: LM
    vector: SteeringVector
    alpha: float
    prompts: list[str]
    settings: Settings
    run: Run | MemoryRun
    scorer: ScoreFn | None = None
    scorer_name: str | None = None
    show_progress: bool = True
    builds: dict[float, Any] = field(default_factory=dict)  # alpha -> Behaviour built by the dose section

    @property
    def layer(self) -> int:
        return self.vector.layers[0]

    @property
    def s(self) -> torch.Tensor:
        return self.vector[self.layer].to(self.lm.device, self.lm.dtype)

    def with_alpha(self, alpha: float) -> Context:
        return replace(self, alpha=alpha)

    def save(self, name: str, tensors: dict[str, Any]) -> None:
        """Store a (one-level nested) dict of tensors for later sections (safetensors in a folder run)."""
        self.run.save_tensors(name, tensors)

    def load(self, name: str) -> dict[str, Any]:
        return self.run.load_tensors(name)
