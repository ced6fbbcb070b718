"""Configuration of the reasoning study (CPU-sized defaults) and the documented GPU preset."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

from steerscope._cliargs import DTYPE_HELP, DTYPES
from steerscope.errors import StudyError
from steerscope.studies.protocol import StudyConfig, option


@dataclass(frozen=True)
class Config(StudyConfig):
    """Everything that determines a run (saved as config.json in the run folder).

    ``layers`` accepts ints (negative counts from the end) and ``"mid"``; each is trained as a
    single-layer vector. ``train_all`` adds one vector per layer trained jointly. On the command
    line every option defaults to the ``--preset``'s value. ``backend="vllm"`` runs the evaluation
    generations that are unsteered or plainly steered (a vector at alpha 1, ``mlp_out`` of the last layer
    included: the engine steers the final norm's input) on a vLLM engine; gated biases and the LoRA policy
    are generated with HF.

    Example:
        >>> Config(layers=("mid", "-1")).resolve_layers(30)
        [15, 29]
    """

    cli_defaults_none = True  # an option not given keeps the preset's value

    model: str = option("smollm2-135m", "alias, folder, .gguf or hub id (default: the preset's)")
    difficulty: str = option("add-1d", "task difficulty (default: the preset's)")
    n_train: int = 200
    n_test: int = option(80, "test problems (default: the preset's)", minimum=1)
    layers: tuple[str, ...] = option(("-2", "-1"), "single layers to train, e.g. mid,-2,-1; every or every:N "
                                     "for a layer sweep (every N-th layer, paper B's Fig. 1)", sep=",")
    joint_pairs: bool = option(False, "also train each pair of single layers jointly (one bias per layer, one "
                               "optimiser) for the layer-pair gain", flag="--joint-pairs")
    pair_layers: tuple[str, ...] = option((), "the single layers whose pairs the layer-pair step combines, e.g. "
                                          "-2,-1 (default: every single layer; a sweep has many pairs)", sep=",")
    train_all: bool = option(True, "skip the all-layers vector", flag="--no-all")
    lora: bool = option(True, "skip the LoRA baseline", flag="--no-lora")
    lora_rank: int = 2
    steps: int = option(10, "RLOO steps per trained vector", minimum=1)
    prompts_per_step: int = option(4, "prompts per RLOO step", minimum=1)
    k: int = option(8, "samples per prompt (RLOO's leave-one-out baseline needs 2)", minimum=2)
    lr: float = option(0.1, "learning rate of the bias")  # SmolLM2 residual norms are 150-900: |bias| ~10-50 matters
    lora_lr: float = 1e-3
    max_new_tokens: int = option(16, "new tokens per generation, training and evaluation (default: the preset's)",
                                 minimum=1)
    temperature: float = 1.0
    eval_samples: int = option(8, "samples at T = 1 per test problem for pass@1, the primary accuracy", minimum=0)
    n_analysis: int = 24
    gate: bool = option(False, "adaptive per-token scaling of every trained bias")
    transfer_model: str | None = option("smollm2-135m-safe", "a model of the same depth and width to transfer to "
                                        "(both directions, transfer.py)")
    transfer: bool = option(True, "skip the transfer step", flag="--no-transfer")
    seeds: int = option(3, "training seeds of the penultimate-layer headline vector (seeds.py)", minimum=1)
    gate_compare: bool = option(True, "skip the gated vs plain comparison (gate.py)", flag="--no-gate-compare")
    sae: bool = option(True, "skip the SAE / DiffSAE step (sae_step.py)", flag="--no-sae")
    sae_width: int = 1024
    sae_k: int = 16
    sae_samples: int = 1  # sampled completions per train prompt, steered and unsteered
    system: str | None = None
    shots: int = option(0, "worked examples shown before each problem as earlier chat turns (few-shot prompting; "
                           "task.examples), in training and evaluation alike (default: the preset's)", minimum=0)
    seed: int = option(0, "random seed")
    dtype: str = option("float32", f"{DTYPE_HELP} of every model the study loads (default: the preset's, float32)",
                        choices=DTYPES)
    backend: str = option("hf", "engine for the evaluation generations: hf or vllm (docs/vllm.md); gated biases, "
                                "LoRA and last-layer vectors stay on hf", choices=("hf", "vllm"))

    def identity(self) -> dict[str, Any]:
        """What a run folder is checked against on resume: everything but ``backend``, which changes
        speed, not greedy numbers (vLLM's greedy tokens are HF's; its sampler is its own). ``dtype`` (float32),
        ``shots`` and ``pair_layers`` appear only away from their defaults, so run folders written before those
        options existed still resume."""
        d = self.to_dict()
        d.pop("backend")
        if d["dtype"] == "float32":
            d.pop("dtype")
        for key in ("shots", "pair_layers"):
            if not d[key]:
                d.pop(key)
        return d

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--preset`` and the field options (each defaulting to the preset's value)."""
        parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                            help="configuration preset (docs/reasoning.md), one of "
                            "%(choices)s (default: %(default)s)")
        super().add_arguments(parser)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        return preset(ns.preset, **cls.cli_values(ns))

    def resolve_layers(self, n_layers: int) -> list[int]:
        """The single layers as block indices."""
        return _resolve(self.layers, n_layers)

    def resolve_pair_layers(self, n_layers: int) -> list[int]:
        """The single layers the layer-pair step combines (``pair_layers``, default all of them) as block indices."""
        singles = self.resolve_layers(n_layers)
        if not self.pair_layers:
            return singles
        chosen = _resolve(self.pair_layers, n_layers)
        if extra := [x for x in chosen if x not in singles]:
            raise StudyError(f"--pair-layers {','.join(self.pair_layers)} (given, or the preset's) names layer(s) {extra} "
                             f"that are not among the single layers {singles}; add them to --layers, or give "
                             "--pair-layers with two of the single layers (one layer: no pair step)")
        return chosen


def _resolve(specs: tuple[str, ...], n_layers: int) -> list[int]:
    """Layer specs (ints, negative from the end, ``mid``, ``every``, ``every:N``) as sorted block indices."""
    out = []
    for s in specs:
        try:
            if s == "every" or s.startswith("every:"):
                out += list(range(0, n_layers, max(1, int(s.split(":")[1]) if ":" in s else 1)))
                continue
            x = n_layers // 2 if s == "mid" else int(s)
        except ValueError:
            raise StudyError(f"layer {s!r} not understood; use ints (negative from the end), 'mid', "
                             "'every' or 'every:N'") from None
        x = x + n_layers if x < 0 else x
        if not 0 <= x < n_layers:
            raise StudyError(f"layer {s} is out of range for a model with {n_layers} layers")
        out.append(x)
    return sorted(set(out))


PRESETS: dict[str, Config] = {
    "cpu": Config(),
    # The band task (issue 25): multi-step word problems after 6 worked examples (SmolLM2's base accuracy is
    # inside 20-60 %, docs/reasoning.md), 200 test problems; a layer sweep (every 6th layer and the last two),
    # the all-layers vector and the last two layers trained jointly (the layer-pair gain needs all three).
    # The side studies (transfer, seeds, gating, SAE, LoRA) are left to the default preset. Hours on 2 CPU cores.
    "cpu-multi": Config(difficulty="multi-2-tiny", shots=6, n_test=200, max_new_tokens=64,
                        layers=("every:6", "-2", "-1"), pair_layers=("-2", "-1"), joint_pairs=True, train_all=True,
                        lora=False, transfer=False, seeds=1, gate_compare=False, sae=False),
    "tiny": Config(n_train=40, n_test=40, layers=("-2", "-1"), train_all=True, lora=True, steps=4,
                   k=4, prompts_per_step=2, eval_samples=2, n_analysis=8, seeds=2, sae_width=256,
                   sae_k=8, sae_samples=1),
    # A GPU run in the setting of Sinii et al. (2025): a math model, longer answers, 16 samples.
    "gpu-qwen-math": Config(model="Qwen/Qwen2.5-Math-1.5B", difficulty="word", n_train=2000, n_test=500,
                                     layers=("mid", "-2", "-1"), steps=300, prompts_per_step=16, k=16, lr=1e-3,
                                     lora_rank=8, lora_lr=1e-5, max_new_tokens=512, eval_samples=8,
                                     n_analysis=128, transfer_model=None, sae_width=16384, sae_k=64,
                                     system="Please reason step by step, and put your final answer within \\boxed{}."),
}


def preset(name: str, **overrides: Any) -> Config:
    """A preset with some fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise StudyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


ReasoningConfig = Config  # the step modules' name for it
