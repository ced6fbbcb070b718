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
        select_alphas: multiples of the DIM vector scored by the selection; the chosen one scales
            the saved DIM vector, so alpha = -1 / +1 is the selected setting ((1.0,) = paper A).
        matched_norm: also evaluate NTP / PO rescaled to the DIM vector's norm (step
            ``evaluate_matched``), which compares the methods where alpha = 1 saturates.
        dtype: model dtype ("float32"; "bfloat16" for the GPU presets).
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
    select_alphas: tuple[float, ...] = (1.0,)
    matched_norm: bool = False
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5-Coder-0.5B-Instruct on a shared 2-core CPU (docs/refusal.md, "Two families"): few
    # candidate layers, a magnitude grid (alpha = 1 is too weak on this model), short completions
    "qwen-cpu": dict(model="qwen2.5-coder-0.5b", n_train=32, n_val=8, layers=(12, 14, 16), positions=(-5, -1),
                     select_alphas=(2.0, 4.0, 8.0), n_test=16, max_new_tokens=10, n_trained=8, trained_epochs=2,
                     trained_batch=4, trained_tokens=12, gen_batch=16, matched_norm=True),
    # paper A's configurations (Cheng et al. 2026, Appendix B): 128 train / 32 val prompts per side,
    # candidates at every layer below 0.8 L and the post-instruction positions, alpha = +-1,
    # 100 + 100 test prompts, NTP / PO on 256 + 256 examples, 64 training tokens, 10 epochs,
    # lr 0.01, batch 6, phi 2e-2; bfloat16 on a GPU. Not run here (no GPU, no hub).
    "paper-a-gemma2": dict(model="google/gemma-2-2b-it", n_train=128, n_val=32, n_test=100, layer_stride=1,
                           positions=(-5, -4, -3, -2, -1), alphas=(1.0,), max_new_tokens=256, n_trained=256,
                           trained_epochs=10, trained_lr=0.01, trained_batch=6, trained_tokens=64, phi=2e-2,
                           gen_batch=64, matched_norm=True, dtype="bfloat16"),
    "paper-a-llama3": dict(model="meta-llama/Llama-3.2-3B-Instruct", n_train=128, n_val=32, n_test=100,
                           layer_stride=1, positions=(-5, -4, -3, -2, -1), alphas=(1.0,), max_new_tokens=256,
                           n_trained=256, trained_epochs=10, trained_lr=0.01, trained_batch=6, trained_tokens=64,
                           phi=2e-2, gen_batch=64, matched_norm=True, dtype="bfloat16"),
}
"""Named configurations for ``--preset``; explicit command-line options override them."""
