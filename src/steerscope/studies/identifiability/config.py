"""Configuration of the identifiability study (a frozen dataclass; the defaults are the measured CPU run)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from steerscope._cliargs import DTYPE_HELP, DTYPES
from steerscope.data.names import TRAIT_NAMES as TRAITS
from steerscope.errors import StudyError
from steerscope.studies.protocol import StudyConfig, option

PCA_PAPER = ("pca_paper", "pca_paper_flipped")  # paper C's PCA vector with the SVD's sign, and with it flipped
METHODS = ("dim", "pca") + PCA_PAPER
PAPER_C: dict[str, Any] = dict(alphas=(1.0,), positions="last+generated", offset=1)
"""Paper C's steering setting (its code): alpha = 1, the vector added at the last position of every forward
call, at the output of ``layers[L//2]`` (offset 1). ``Config(**PAPER_C)``; on the command line
``--alphas 1 --positions last+generated --offset 1``."""


@dataclass(frozen=True)
class Config(StudyConfig):
    """Options of ``steerscope study identifiability``.

    Args:
        model: model alias or path.
        traits: traits to steer (subset of formality, sentiment, politeness).
        layer: extraction layer (``hidden_states[layer]``); None = n_layers // 2.
        offset: injection layer = layer + offset (1 reproduces paper C's code, which reads
            hidden_states[L//2] but adds at the output of layers[L//2]).
        methods: extraction methods used in the behavioural experiment: dim, pca (``pca_diff``, oriented and
            scaled like DIM) and pca_paper (paper C's PCA variant: first PC of the *centred* per-pair
            differences, rescaled here to |DIM| so the two vectors differ in direction only; only its ``v``
            condition is generated, and it is compared with DIM's ``v``); pca_paper_flipped is the same vector
            with its sign flipped (an SVD's sign is arbitrary; the paper's cosine range spans both signs).
        positions: where the vector is added: ``all`` (every position, generated tokens included) or
            ``last+generated`` (the last position of every forward call: paper C's hook).
        margin: the equivalence margin in Cohen's d units (paper C's |d| < 0.2).
        alphas: steering scales swept (0 = no steering is always run as "none").
        seeds: sampling seeds; each seed also draws a fresh v_perp.
        n_prompts: neutral prompts per condition.
        max_new_tokens, temperature: sampling settings.
        ks: dimensions of the random orthogonal subspaces in the next-token test.
        n_k_prompts: prompts used in the k-subspace test.
        k_traits: the first N traits get the k-subspace test.
        n_shift_prompts: shift prompts (even stride over topic/genre/safety).
        shift: run the behavioural test on shift_prompts too (at ``shift_alpha``).
        shift_alpha: alpha of the shift test and the k-subspace test; None = middle alpha.
        n_cov_prompts: prompts whose token activations form the covariance.
        n_jac_prompts: prompts whose logit Jacobians are computed (per layer).
        dtype: weights dtype of the model (float32, float16 or bfloat16).
        backend: ``"hf"`` or ``"vllm"`` for the ``gen_*`` steps' sampled generations; not part of the
            run's identity (a resumed run may switch), but vLLM samples with its own sampler.

    Example:
        >>> Config(traits=("formality",), alphas=(2.0, 4.0, 6.0)).probe_alpha
        4.0
    """

    model: str = option("smollm2-135m", "alias, folder, .gguf or hub id")
    traits: tuple[str, ...] = option(TRAITS, "comma-separated: formality,sentiment,politeness", sep=",")
    layer: int | None = option(None, "extraction layer (default n_layers // 2)", minimum=0)
    offset: int = option(0, "inject at layer + offset (1 = paper C's code: output of layers[L//2])", choices=(0, 1))
    methods: tuple[str, ...] = option(("dim",), "vectors in the behavioural test: dim,pca,pca_paper,pca_paper_flipped",
                                     sep=",")
    positions: str = option("all", "where to add the vector (last+generated = paper C's hook)",
                            choices=("all", "last+generated"))
    margin: float = option(0.2, "equivalence margin in Cohen's d units (paper C: 0.2)")
    alphas: tuple[float, ...] = option((3.0, 6.0), "e.g. 2,4,6 (none is always run)", sep=",")
    seeds: tuple[int, ...] = option((0, 1), "sampling / v_perp seeds, e.g. 0,1", sep=",")
    n_prompts: int = option(8, "neutral prompts per condition (<= 40)", minimum=2, maximum=40)
    max_new_tokens: int = option(16, "sampled tokens per completion", minimum=1)
    temperature: float = option(0.8, "sampling temperature")
    ks: tuple[int, ...] = option((1, 5, 10, 20, 50), "orthogonal subspace dimensions", sep=",")
    n_k_prompts: int = option(2, "prompts in the k-subspace test", minimum=1)
    k_traits: int = option(1, "traits (first N) in the k-subspace test", minimum=1)
    n_shift_prompts: int = option(9, "shift prompts (<= 30)", minimum=1, maximum=30)
    shift: bool = option(True, "skip the behavioural test on shift prompts", flag="--no-shift")
    shift_alpha: float | None = option(None, "alpha of the shift and k tests (default: middle)")
    n_cov_prompts: int = option(64, "prompts whose token activations form the covariance", minimum=1)
    n_jac_prompts: int = option(1, "prompts whose logit Jacobians are computed", minimum=1)
    seed: int = option(0, "random seed")
    dtype: str = option("float32", DTYPE_HELP, choices=DTYPES)
    backend: str = option("hf", "engine for the sampled generations: hf or vllm (docs/vllm.md; vLLM's sampler, so "
                                "not HF's samples)", choices=("hf", "vllm"))
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [t for t in self.traits if t not in TRAITS]
        if bad or not self.traits:
            raise StudyError(f"unknown traits {bad}; use --traits with some of {','.join(TRAITS)}")
        if self.offset not in (0, 1):
            raise StudyError(f"--offset must be 0 or 1, got {self.offset}")
        if [m for m in self.methods if m not in METHODS] or not self.methods or self.methods[0] in PCA_PAPER:
            raise StudyError(f"--methods takes some of {','.join(METHODS)} (pca_paper* not first: compared "
                             f"with the first), got {','.join(self.methods)}")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise StudyError(f"--margin must be a positive number (Cohen's d units), got {self.margin}")
        if not self.alphas or not all(math.isfinite(a) and a > 0 for a in self.alphas):
            raise StudyError("--alphas must be positive finite numbers (alpha 0 is always run as 'none')")
        if not math.isfinite(self.temperature) or self.temperature <= 0 or (
                self.shift_alpha is not None and not math.isfinite(self.shift_alpha)):
            raise StudyError("--temperature must be a positive finite number and --shift-alpha finite")
        if not self.seeds:
            raise StudyError("--seeds needs at least one seed")
        if self.n_prompts < 2 or self.n_prompts > 40:
            raise StudyError("--n-prompts must be between 2 and 40 (the neutral set has 40 prompts)")
        self.require_at_least_one("max_new_tokens")
        if any(k < 1 or k > 200 for k in self.ks):
            raise StudyError("--ks must be between 1 and 200")

    def identity(self) -> dict[str, Any]:
        """What a run folder is checked against on resume: everything but ``backend`` (the engine; the
        same distribution, sampled by vLLM's sampler instead of HF's). ``positions``, ``margin`` and ``dtype`` appear only
        when not at their defaults, so run folders written before these options existed still resume."""
        d = self.to_dict()
        d.pop("backend")
        for k, default in (("positions", "all"), ("margin", 0.2), ("dtype", "float32")):
            if d[k] == default:
                d.pop(k)
        return d

    @property
    def probe_alpha(self) -> float:
        return self.shift_alpha if self.shift_alpha is not None else sorted(self.alphas)[len(self.alphas) // 2]
