"""Configuration of the reasoning study (CPU-sized defaults) and the documented GPU preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from steerscope.errors import StudyError


@dataclass(frozen=True)
class ReasoningConfig:
    """Everything that determines a run (saved as config.json in the run folder).

    ``layers`` accepts ints (negative counts from the end) and ``"mid"``; each is trained as a
    single-layer vector. ``train_all`` adds one vector per layer trained jointly.
    """

    model: str = "smollm2-135m"
    difficulty: str = "add-1d"
    n_train: int = 200
    n_test: int = 80
    layers: tuple[str, ...] = ("-2", "-1")
    train_all: bool = True
    lora: bool = True
    lora_rank: int = 2
    steps: int = 10
    prompts_per_step: int = 4
    k: int = 8
    lr: float = 0.1  # residual norms of SmolLM2 are 150-900: a bias needs norm ~10-50 to matter
    lora_lr: float = 1e-3
    max_new_tokens: int = 16
    temperature: float = 1.0
    eval_samples: int = 1
    n_analysis: int = 24
    gate: bool = False
    transfer_model: str | None = "smollm2-135m-safe"  # same depth/width sibling; both directions (transfer.py)
    seeds: int = 3  # the penultimate-layer vector trained with seeds seed..seed+seeds-1 (seeds.py)
    gate_compare: bool = True  # also train the gated penultimate-layer vector, same budget (gate.py)
    sae: bool = True  # SAE and DiffSAE on the penultimate layer's residual (sae_step.py)
    sae_width: int = 1024
    sae_k: int = 16
    sae_samples: int = 1  # sampled completions per train prompt, steered and unsteered
    system: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve_layers(self, n_layers: int) -> list[int]:
        """The single layers as block indices."""
        out = []
        for s in self.layers:
            try:
                x = n_layers // 2 if s == "mid" else int(s)
            except ValueError:
                raise StudyError(f"layer {s!r} not understood; use ints (negative from the end) or 'mid'") from None
            x = x + n_layers if x < 0 else x
            if not 0 <= x < n_layers:
                raise StudyError(f"layer {s} is out of range for a model with {n_layers} layers")
            out.append(x)
        return sorted(set(out))


PRESETS: dict[str, ReasoningConfig] = {
    "cpu": ReasoningConfig(),
    "tiny": ReasoningConfig(n_train=40, n_test=40, layers=("-2", "-1"), train_all=True, lora=True, steps=4,
                            k=4, prompts_per_step=2, eval_samples=1, n_analysis=8, seeds=2, sae_width=256,
                            sae_k=8, sae_samples=1),
    # A GPU run in the setting of Sinii et al. (2025): a math model, longer answers, 16 samples.
    "gpu-qwen-math": ReasoningConfig(model="Qwen/Qwen2.5-Math-1.5B", difficulty="word", n_train=2000, n_test=500,
                                     layers=("mid", "-2", "-1"), steps=300, prompts_per_step=16, k=16, lr=1e-3,
                                     lora_rank=8, lora_lr=1e-5, max_new_tokens=512, eval_samples=4,
                                     n_analysis=128, transfer_model=None, sae_width=16384, sae_k=64,
                                     system="Please reason step by step, and put your final answer within \\boxed{}."),
}


def preset(name: str, **overrides: Any) -> ReasoningConfig:
    """A preset with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise StudyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
