"""Configuration of the refusal study (``steerscope study refusal``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerscope.studies.protocol import StudyConfig, option


@dataclass(frozen=True)
class Config(StudyConfig):
    """Every knob of the study; the defaults reproduce docs/refusal.md.

    Attributes:
        model: the refusing model (default the shipped organism); any HF id/folder works.
        n_train: prompts per side for the DIM means (train split).
        n_val: prompts per side for the selection scores (val split).
        n_test: prompts per side for the ASR table (test split).
        positions: post-instruction candidate positions.
        layer_stride: score every k-th layer below 0.8 L (1 = all, as Arditi et al.).
        layers: explicit candidate layers (overrides layer_stride).
        alphas: steering magnitudes evaluated (bypass uses -a, induce +a); 1.0 is paper A's.
        max_new_tokens: greedy completion length.
        n_trained: prompts per side for the NTP/PO data (train split).
        trained_epochs, trained_lr, trained_batch, trained_tokens, phi: trainer settings.
        gen_batch: prompts per batched greedy generation.
        retrain_organism: rebuild the organism instead of reusing the shipped adapter.
        shipped_vectors: evaluate the shipped DIM / NTP / PO vectors instead of this run's (skips
            NTP / PO training; the selection still runs for the heatmap).
        threads: torch CPU threads (speed only; not part of the run's identity).

    Example:
        >>> Config(n_test=20, alphas=(0.5, 1.0)).to_dict()["alphas"]
        [0.5, 1.0]
    """

    model: str = option("smollm2-135m-safe", "alias, folder, .gguf or hub id of the refusing model")
    seed: int = option(0, "random seed")
    n_train: int = option(128, "train prompts per side for the DIM means")
    n_val: int = option(16, "validation prompts per side for selection")
    n_test: int = option(100, "test prompts per side for the ASR table")
    positions: tuple[int, ...] = (-5, -4, -3, -2, -1)
    layer_stride: int = option(2, "score every k-th layer (1 = all)")
    layers: tuple[int, ...] | None = option(None, "explicit candidate layers, e.g. 6,8,10 (overrides --layer-stride)",
                                            sep=",")
    alphas: tuple[float, ...] = option((1.0,), "steering magnitudes", nargs="+")
    max_new_tokens: int = option(64, "greedy completion length")
    n_trained: int = option(64, "prompts per side for NTP/PO data")
    trained_epochs: int = option(3, "NTP / PO epochs")
    # paper A: 0.01 with far more data; 0.01 barely moves the vector here
    trained_lr: float = option(0.3, "Adam learning rate for NTP / PO")
    trained_batch: int = option(8, "NTP / PO batch size")
    trained_tokens: int = 32
    phi: float = 2e-2
    gen_batch: int = option(32, "prompts per batched generation")
    retrain_organism: bool = option(False, "rebuild the LoRA organism (slow)")
    shipped_vectors: bool = option(False, "evaluate the shipped organism vectors instead of this run's "
                                          "(skips NTP/PO training)")
    threads: int = option(1, "torch CPU threads")
    extra: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What a run folder is checked against on resume (``threads`` changes speed, not numbers)."""
        d = self.to_dict()
        d.pop("threads")
        return d


RefusalConfig = Config  # the step modules' name for it
