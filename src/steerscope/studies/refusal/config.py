"""Configuration of the refusal study (``steerscope study refusal``)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from typing import Any

from steerscope._cliargs import DTYPE_HELP, DTYPES
from steerscope.errors import StudyError
from steerscope.studies.protocol import StudyConfig, option, split_list


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
        select_alphas: multiples of the DIM vector scored by the selection; the chosen one scales
            the saved DIM vector, so alpha = -1 / +1 is the selected setting ((1.0,) = paper A).
        matched_norm: also evaluate NTP / PO rescaled to the DIM vector's norm (step
            ``evaluate_matched``), which compares the methods where alpha = 1 saturates.
        dtype: model dtype ("float32"; "bfloat16" for the GPU presets).
        threads: torch CPU threads (speed only; not part of the run's identity).
        backend: ``"hf"`` or ``"vllm"`` for the evaluation step's generations (the ASR table).

    On the command line ``--preset NAME`` starts from :data:`PRESETS` ``[NAME]``; an option
    given a value other than its default overrides the preset.

    Example:
        >>> Config(n_test=20, alphas=(0.5, 1.0)).to_dict()["alphas"]
        [0.5, 1.0]
    """

    model: str = option("smollm2-135m-safe", "alias, folder, .gguf or hub id of the refusing model")
    seed: int = option(0, "random seed")
    n_train: int = option(128, "train prompts per side for the DIM means", minimum=1)
    n_val: int = option(16, "validation prompts per side for selection", minimum=1)
    n_test: int = option(100, "test prompts per side for the ASR table", minimum=1)
    positions: tuple[int, ...] = (-5, -4, -3, -2, -1)
    layer_stride: int = option(2, "score every k-th layer (1 = all)", minimum=1)
    layers: tuple[int, ...] | None = option(None, "explicit candidate layers, e.g. 6,8,10 (overrides --layer-stride)",
                                            sep=",")
    alphas: tuple[float, ...] = option((1.0,), "comma-separated steering magnitudes, e.g. 0.5,1", sep=",")
    max_new_tokens: int = option(64, "greedy completion length", minimum=1)
    n_trained: int = option(64, "prompts per side for NTP/PO data", minimum=1)
    trained_epochs: int = option(3, "NTP / PO epochs", minimum=1)
    # paper A: 0.01 with far more data; 0.01 barely moves the vector here
    trained_lr: float = option(0.3, "Adam learning rate for NTP / PO")
    trained_batch: int = option(8, "NTP / PO batch size", minimum=1)
    trained_tokens: int = 32
    phi: float = 2e-2
    gen_batch: int = option(32, "prompts per batched generation", minimum=1)
    retrain_organism: bool = option(False, "rebuild the LoRA organism (slow)")
    shipped_vectors: bool = option(False, "evaluate the shipped organism vectors instead of this run's "
                                          "(skips NTP/PO training)")
    select_alphas: tuple[float, ...] = option((1.0,), "comma-separated multiples of the DIM vector scored by "
                                                      "the selection, e.g. 2,4,8 (the pick scales the saved vector)",
                                                      sep=",")
    matched_norm: bool = option(False, "also evaluate NTP/PO rescaled to the DIM norm")
    dtype: str = option("float32", f"{DTYPE_HELP} (bfloat16 in the GPU presets)", choices=DTYPES)
    threads: int = option(1, "torch CPU threads", minimum=1)
    backend: str = option("hf", "engine for the ASR table's generations (vllm: docs/vllm.md)", choices=("hf", "vllm"))
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse impossible sizes and magnitudes in one line, before any model loads."""
        super().__post_init__()
        self.require_at_least_one("n_train", "n_val", "n_test", "max_new_tokens", "n_trained", "trained_epochs",
                                  "trained_batch", "trained_tokens", "gen_batch", "layer_stride", "threads")
        for name in ("alphas", "select_alphas"):
            bad = [a for a in getattr(self, name) if not (math.isfinite(a) and a > 0)]
            if bad or not getattr(self, name):
                raise StudyError(f"--{name.replace('_', '-')} must be finite magnitudes > 0 (got {bad or 'none'}); "
                                 "the sign is set by the direction (bypass -a, induce +a)")
        if not (math.isfinite(self.trained_lr) and self.trained_lr > 0):
            raise StudyError(f"--trained-lr must be a finite number > 0 (got {self.trained_lr})")

    def identity(self) -> dict[str, Any]:
        """What a run folder is checked against on resume (``threads`` and ``backend`` change speed, not
        numbers: greedy vLLM output is HF's token for token)."""
        d = self.to_dict()
        d.pop("threads")
        d.pop("backend")
        return d

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--preset`` and ``--positions`` plus the field options."""
        parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                            help="a named configuration (docs/refusal.md), one of %(choices)s; "
                            "explicit options override it (default: none)")
        parser.add_argument("--positions", default=None, help="candidate positions, e.g. -5,-1 (default -5..-1)")
        super().add_arguments(parser)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        """The preset (if any), then every option whose value differs from its default."""
        vals = cls.cli_values(ns)
        if getattr(ns, "positions", None):
            vals["positions"] = split_list(ns.positions, int, "--positions")
        name = getattr(ns, "preset", None)
        if not name:
            return cls(**vals)
        d = cls().to_dict()
        plain = cls(**vals).to_dict()
        over = {k: v for k, v in vals.items() if plain[k] != d[k]}
        return replace(cls(**PRESETS[name]), **over)


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5-Coder-0.5B-Instruct on 2 CPU cores (docs/refusal.md, "Two families"): few candidate
    # layers, a magnitude grid (alpha = 1 is too weak on this model), the full 100 + 100 test split
    # at 32 greedy tokens and alpha 0.25 / 0.5 / 1 (at 1 every method saturates the bypass), NTP / PO
    # on 32 + 32 prompts, matched-norm rows
    "qwen-cpu": dict(model="qwen2.5-coder-0.5b", n_train=32, n_val=8, layers=(12, 14, 16), positions=(-5, -1),
                     select_alphas=(2.0, 4.0, 8.0), alphas=(0.25, 0.5, 1.0), n_test=100, max_new_tokens=32,
                     n_trained=32, trained_epochs=3,
                     trained_batch=8, trained_tokens=16, gen_batch=32, matched_norm=True),
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


RefusalConfig = Config  # the step modules' name for it
