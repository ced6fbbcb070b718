"""Configuration of the refusal study (``steerscope study refusal``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RefusalConfig:
    """Every knob of the study; the defaults reproduce docs/refusal.md.

    Attributes:
        model: the refusing model (default the shipped organism); any HF id/folder works.
        n_train: prompts per side for the DIM means (train split).
        n_val: prompts per side for the selection scores (val split).
        n_test: prompts per side for the ASR table (test split).
        positions: post-instruction candidate positions.
        layer_stride: score every k-th layer below 0.8 L (1 = all, as Arditi et al.).
        alphas: steering magnitudes evaluated (bypass uses -a, induce +a); 1.0 is paper A's.
        max_new_tokens: greedy completion length.
        n_trained: prompts per side for the NTP/PO data (train split).
        trained_epochs, trained_lr, trained_batch, trained_tokens, phi: trainer settings.
        gen_batch: prompts per batched greedy generation.
        retrain_organism: rebuild the organism instead of reusing the shipped adapter.
        shipped_vectors: evaluate the shipped DIM / NTP / PO vectors instead of this run's (skips
            NTP / PO training; the selection still runs for the heatmap).
        backend: ``"hf"`` or ``"vllm"`` for the evaluation step's generations (the ASR table).
    """

    model: str = "smollm2-135m-safe"
    seed: int = 0
    n_train: int = 128
    n_val: int = 16
    n_test: int = 100
    positions: tuple[int, ...] = (-5, -4, -3, -2, -1)
    layer_stride: int = 2
    layers: tuple[int, ...] | None = None  # explicit candidate layers (overrides layer_stride)
    alphas: tuple[float, ...] = (1.0,)
    max_new_tokens: int = 64
    n_trained: int = 64
    trained_epochs: int = 3
    trained_lr: float = 0.3  # paper A: 0.01 with far more data; 0.01 barely moves the vector here
    trained_batch: int = 8
    trained_tokens: int = 32
    phi: float = 2e-2
    gen_batch: int = 32
    retrain_organism: bool = False
    shipped_vectors: bool = False
    backend: str = "hf"  # generation engine of the ASR table: "hf" or "vllm" (docs/vllm.md)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
