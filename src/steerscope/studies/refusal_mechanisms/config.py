"""Configuration of the refusal-mechanisms study (a frozen dataclass, stored in the run folder)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerscope._cliargs import DTYPE_HELP, DTYPES
from steerscope.errors import StudyError
from steerscope.studies.protocol import StudyConfig, option

SHIPPED = {"dim": "smollm2-135m-safe/refusal-dim", "ntp": "smollm2-135m-safe/refusal-ntp",
           "po": "smollm2-135m-safe/refusal-po"}


@dataclass(frozen=True)
class Config(StudyConfig):
    """Everything that determines the study's numbers.

    ``vectors`` maps a method name (dim, ntp, po) to a shipped name or a .safetensors path (on the
    command line: ``--vectors`` or ``--vector-dir``). ``alpha_bypass`` (< 0, harmful prompts) and
    ``alpha_induce`` (> 0, harmless prompts) follow paper A's Appendix B.1 signs.

    Example:
        >>> Config(n_eval=8).vectors["dim"]
        'smollm2-135m-safe/refusal-dim'
    """

    model: str = option("smollm2-135m-safe", "alias, folder, .gguf or hub id of the refusing model")
    vectors: dict[str, str] = field(default_factory=lambda: dict(SHIPPED))
    alpha_bypass: float = option(-1.0, "steering scale on harmful prompts (< 0)")
    alpha_induce: float = option(1.0, "steering scale on harmless prompts (> 0)")
    n_attr: int = option(8, "prompts per attribution set (before the behaviour-flip filter)", minimum=1)
    attr_tokens: int = option(24, "teacher-forced response length for EAP-IG", minimum=1)
    steps: int = option(10, "IG midpoint steps T", minimum=1)
    n_check: int = 4  # prompts for the EAP-IG vs exact patching check
    circuit_fracs: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    threshold: float = 0.85
    bisect_steps: int = 4  # refine the minimal faithful circuit between grid sizes
    n_eval: int = option(32, "prompts per ASR measurement (sparsity curves; offsets the attribution prompts)",
                         minimum=1)
    n_ablate: int = option(64, "prompts per Table-1 ablation setting (0 = --n-eval); the first of the test split",
                           minimum=0)
    eval_tokens: int = option(32, "greedy tokens per ASR completion", minimum=1)
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    paper_taus: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5)  # paper A's signed τ grid
    n_null: int = option(19, "random vectors per vector for the IoU random-vector null (0 = hypergeometric only)",
                         minimum=0)
    batch_size: int = 16
    seed: int = option(0, "random seed")
    eval_offset: int = 0  # offset into the test split: eval prompts, then the attribution prompts
    dtype: str = option("float32", f"{DTYPE_HELP} (bfloat16 in the GPU presets)", choices=DTYPES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha_bypass >= 0 or self.alpha_induce <= 0:
            raise StudyError("use --alpha-bypass < 0 (subtract s on harmful prompts) and --alpha-induce > 0")
        self.require_at_least_one("n_eval", "n_attr", "attr_tokens", "steps", "eval_tokens", "batch_size", "n_check")
        if self.n_ablate < 0:
            raise StudyError(f"--n-ablate must be 0 (= --n-eval) or more (got {self.n_ablate})")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The field options, plus ``--vectors``, ``--vector-dir`` and ``--quick``."""
        super().add_arguments(parser)
        parser.add_argument("--vectors", default=None, help="name=path pairs, e.g. dim=a.safetensors,po=b.safetensors "
                            "(default: the shipped smollm2-135m-safe/refusal-{dim,ntp,po})")
        parser.add_argument("--vector-dir", default=None, help="a refusal run folder: use its dim/ntp/po *.safetensors")
        parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
        parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                            help="a named configuration (docs/refusal-mechanisms.md), one of %(choices)s; "
                            "explicit options override it (default: none)")

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Config:
        if ns.vectors and ns.vector_dir:
            raise StudyError("give --vectors or --vector-dir, not both")
        vals = cls.cli_values(ns)
        if getattr(ns, "preset", None):  # options left at their defaults keep the preset's values
            d = cls().to_dict()
            vals = dict(PRESETS[ns.preset]) | {k: v for k, v in vals.items() if v != d[k]}
        if ns.vectors:
            vals["vectors"] = parse_vectors(ns.vectors)
        elif ns.vector_dir:
            vals["vectors"] = vectors_from_dir(ns.vector_dir)
        if ns.quick:
            vals.update(QUICK)
        return cls(**vals)


# ``--quick``: tiny sizes for a smoke test
QUICK: dict[str, Any] = {"n_eval": 4, "n_ablate": 0, "eval_tokens": 8, "n_attr": 3, "attr_tokens": 6, "steps": 2, "n_check": 2,
                         "sparsities": (0.5, 0.9), "circuit_fracs": (0.05, 0.3, 1.0),
                         "paper_taus": (0.0, 0.5), "n_null": 2}


def vectors_from_dir(folder: str | Path) -> dict[str, str]:
    """Find dim / ntp / po vectors (``*.safetensors`` whose name contains the method) in a refusal run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"--vector-dir {folder} is not a folder; give a refusal run folder holding *.safetensors")
    found: dict[str, str] = {}
    files = sorted(folder.rglob("*.safetensors"))
    for method in ("dim", "ntp", "po"):
        hits = [f for f in files if method in f.stem.lower().replace("-", "_").split("_") or f.stem.lower() == method
                or f.stem.lower().endswith(f"-{method}")]
        if hits:
            found[method] = str(hits[0])
    if "dim" not in found:
        raise StudyError(f"no DIM vector (a *.safetensors named like 'dim' or 'refusal-dim') under {folder}")
    return found


def parse_vectors(spec: str) -> dict[str, str]:
    """``"dim=path.safetensors,po=smollm2-135m-safe/refusal-po"`` -> dict."""
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise StudyError(f"--vectors takes name=path pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    if "dim" not in out:
        raise StudyError("--vectors must include dim=... (the ablation table uses the DIM vector)")
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5-Coder-0.5B-Instruct on a shared 2-core CPU (docs/refusal-mechanisms.md): its own
    # vectors from `steerscope study refusal --preset qwen-cpu` (shipped, scaled so that alpha
    # +-1 is the selected setting), small prompt counts, short completions
    "qwen-cpu": dict(model="qwen2.5-coder-0.5b",
                     vectors={"dim": "qwen2.5-coder-0.5b/refusal-dim", "ntp": "qwen2.5-coder-0.5b/refusal-ntp",
                              "po": "qwen2.5-coder-0.5b/refusal-po"},
                     n_eval=32, n_ablate=64, eval_tokens=16, n_attr=8, attr_tokens=12, steps=6, n_check=2,
                     circuit_fracs=(0.005, 0.02, 0.05, 0.1, 0.2, 0.4), bisect_steps=2,
                     sparsities=(0.5, 0.9, 0.99), batch_size=16),
    # paper A (Cheng et al. 2026): Gemma 2 2B-it, DIM at layer 15, position -1; Llama 3.2 3B-Instruct,
    # layer 12, position -4; alpha +-1; 100 JBB / 100 Alpaca prompts for Table 1, greedy, T = 10 (the
    # attribution prompts follow the first n_eval = 64 test prompts, so a 100-prompt split leaves 32); vectors from
    # `steerscope study refusal --preset paper-a-*` (pass --vector-dir). bfloat16 on a GPU. Not run here.
    "paper-a-gemma2": dict(model="google/gemma-2-2b-it", n_eval=64, n_ablate=100, eval_tokens=256, n_attr=32, attr_tokens=64,
                           steps=10, n_check=8, sparsities=(0.2, 0.5, 0.8, 0.9, 0.95, 0.99), batch_size=32,
                           dtype="bfloat16"),
    "paper-a-llama3": dict(model="meta-llama/Llama-3.2-3B-Instruct", n_eval=64, n_ablate=100, eval_tokens=256, n_attr=32,
                           attr_tokens=64, steps=10, n_check=8, sparsities=(0.2, 0.5, 0.8, 0.9, 0.95, 0.99),
                           batch_size=32, dtype="bfloat16"),
}
"""Named configurations for ``--preset``; options given on the command line override them."""
