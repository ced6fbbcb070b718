"""The one seam for generation engines: a batch of :class:`Request` s in, one completion per request out.

A request carries everything about itself: its prompt (and how the prompt meets the chat template),
its own intervention, and its sampling options. An engine may batch requests however it likes; it
returns the completions (new text only) in request order.

1. :class:`Addition` -- add ``alpha * vector`` at the vector's site and ``positions`` (both engines).
2. A context factory ``Callable[[], ContextManager]`` -- anything that intervenes while its context is
   open: a gated steering bias's or a LoRA policy's ``active`` (HF only: vLLM runs in another process).
3. ``None`` -- unsteered.

Engines: :class:`steerscope.backends.hf.HFEngine` (Hugging Face ``generate`` in this process) and
:class:`steerscope.backends.vllm.VLLMEngine` (a vLLM engine in its own environment, docs/vllm.md);
:func:`engine` makes one from a backend name, as ``ss.generate(..., backend=...)`` does.

Example:
    >>> eng = engine("hf")
    >>> eng.generate(lm, [Request("Hi"), Request("Hi", Addition(vec, alpha=4.0), do_sample=True, seed=0)])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Literal, Protocol, Sequence

from steerscope.errors import BackendError as BackendError  # defined in errors.py; re-exported
from steerscope.errors import SteerscopeError
from steerscope.steer import Positions
from steerscope.vector import SteeringVector

if TYPE_CHECKING:
    from steerscope.conditional.condition import Gate
    from steerscope.models.lm import LM

BACKENDS = ("hf", "vllm")
TEMPLATES = ("apply", "applied", "none")
Template = Literal["apply", "applied", "none"]
"""How a prompt meets the chat template: ``apply`` it (with the request's system message), the prompt
has it ``applied`` already (no extra special tokens), or ``none`` (raw text, the tokenizer's own special tokens)."""
ContextFactory = Callable[[], ContextManager[Any]]


@dataclass(frozen=True)
class Addition:
    """Add ``alpha * vector[l]`` at the vector's site of each of its layers l, at ``positions``.

    Args:
        vector: the steering vector.
        alpha: its scale.
        positions: ``all`` / ``prompt`` / ``generated`` (both engines), ``last-K`` or indices (HF only);
            see :mod:`steerscope.steer`.
        condition: steer a row only where this gate (:class:`steerscope.Condition`, or ``~`` / ``|`` / ``&`` of
            them) is open on its own activations (HF, and vLLM's eager engine; docs/conditional.md).

    Example:
        >>> Request("How do I bake bread?", Addition(vec, alpha=4.0))
    """

    vector: SteeringVector
    alpha: float = 1.0
    positions: Positions = "all"
    condition: Gate | None = None


Intervention = Addition | ContextFactory | None


@dataclass(frozen=True)
class Request:
    """One generation: a prompt, its intervention and its sampling options.

    Args:
        prompt: the user message (``template="apply"``), or the text to continue.
        intervention: an :class:`Addition`, a context factory (HF only), or None (unsteered).
        system: system message (with ``template="apply"``).
        template: see :data:`Template`.
        max_new_tokens: tokens to generate at most.
        do_sample: sample (else greedy).
        temperature, top_p, top_k: sampling options (``top_p=1.0`` and ``top_k=0`` are off).
        seed: sampling seed (None: a fresh one). Requests that share a seed and options are one random
            stream on HF; on vLLM each gets its own seed derived from it (``backends.vllm.row_seeds``).

    Example:
        >>> Request("Solve 2 + 3.", bias.active, do_sample=True, seed=7, max_new_tokens=16)
    """

    prompt: str
    intervention: Intervention = None
    system: str | None = None
    template: Template = "apply"
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise SteerscopeError(f"template {self.template!r} not known; use one of {', '.join(TEMPLATES)}")
        if not (self.intervention is None or isinstance(self.intervention, Addition) or callable(self.intervention)):
            raise SteerscopeError("a request's intervention is an Addition(vector, alpha, positions), a function "
                                  "returning a context manager, or None")
        check_sampling(self.temperature if self.do_sample else 1.0, self.top_p, self.top_k)

    def sampling(self) -> tuple[Any, ...]:
        """The options that decide how tokens are picked (only ``max_new_tokens`` when greedy)."""
        if not self.do_sample:
            return (self.max_new_tokens, False)
        return (self.max_new_tokens, True, self.temperature, self.top_p, self.top_k, self.seed)


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Refuse sampling options out of range: temperature > 0, 0 < top_p <= 1, top_k a whole number >= 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not \
            math.isfinite(temperature) or temperature <= 0:
        raise SteerscopeError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise SteerscopeError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SteerscopeError(f"top_k must be a whole number >= 0 (0 = off), got {top_k!r}")


class Engine(Protocol):
    """What generates: completions (new text only) of ``requests``, in their order."""

    name: str

    def generate(self, lm: LM, requests: Sequence[Request]) -> list[str]:
        """One completion per request."""
        ...


def _factory_key(factory: Any) -> Any:
    """A context factory as a group key: itself when hashable (``bias.active == bias.active``), else its id."""
    try:
        hash(factory)
    except TypeError:
        return ("id", id(factory))
    return factory


def groups(requests: Sequence[Request]) -> list[list[int]]:
    """Indices of ``requests`` that one engine call can take together, in first-appearance order.

    A group shares the sampling options (seed included), whether the text is templated, and the kind of
    intervention: one context factory, or additions at one ``positions`` setting (vectors and alphas may
    differ per row). Unsteered rows join the first additions with their options, else form their own group.

    Example:
        >>> groups([Request("a", bias.active), Request("b", Addition(v)), Request("c")])
        [[0], [1, 2]]
    """
    def key(r: Request, positions: Any) -> tuple[Any, ...]:
        return (r.sampling(), r.template == "none", positions)

    first_pos: dict[tuple[Any, ...], Any] = {}  # where unsteered rows go: the first additions of their kind
    for r in requests:
        if isinstance(r.intervention, Addition):
            pos = r.intervention.positions
            first_pos.setdefault(key(r, None), ("add", pos if isinstance(pos, str) else tuple(pos),
                                                r.intervention.condition))
    out: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(requests):
        iv = r.intervention
        if isinstance(iv, Addition):
            kind: Any = ("add", iv.positions if isinstance(iv.positions, str) else tuple(iv.positions), iv.condition)
        elif iv is None:
            kind = first_pos.get(key(r, None), None)
        else:
            kind = ("ctx", _factory_key(iv))
        out.setdefault(key(r, kind), []).append(i)
    return list(out.values())


def engine(backend: str = "hf", batch_size: int | None = None, show_progress: bool = False, compiled: bool = False,
           engine_args: dict[str, Any] | None = None) -> Engine:
    """The engine of a backend name (``hf`` or ``vllm``).

    Args:
        backend: ``hf`` or ``vllm``.
        batch_size: prompts per HF ``generate`` call (None: packed to a token budget; vLLM batches continuously).
        show_progress: a progress bar over HF batches.
        compiled, engine_args: vLLM only: its compiled mode, and more ``LLM(...)`` arguments
            (e.g. ``{"tensor_parallel_size": 2}``); refused for ``hf``.

    Returns:
        An :class:`Engine`.

    Example:
        >>> engine("vllm").generate(lm, [Request("Hi", Addition(vec, 2.0))])
    """
    if backend == "hf" and (compiled or engine_args):
        raise SteerscopeError("compiled and engine_args apply to backend='vllm' only")
    if backend == "hf":
        from steerscope.backends.hf import HFEngine

        return HFEngine(batch_size=batch_size, show_progress=show_progress)
    if backend == "vllm":
        from steerscope.backends.vllm import VLLMEngine

        return VLLMEngine(compiled=compiled, engine_args=engine_args)
    raise SteerscopeError(f"backend {backend!r} not known; use 'hf' or 'vllm'")


def requests(prompts: Sequence[str], vector: SteeringVector | Sequence[SteeringVector | None] | None = None,
             alpha: float | Sequence[float] = 1.0, positions: Positions = "all", condition: Gate | None = None,
             **options: Any) -> list[Request]:
    """One request per prompt, steered by one vector and alpha for all, or by one of each per prompt.

    Args:
        prompts: the prompts.
        vector: a vector, None, or a list with one vector (or None) per prompt.
        alpha: a float, or a list with one per prompt.
        positions: where the vectors are added.
        condition: the gate of every steered row (see :class:`Addition`).
        options: the other :class:`Request` fields (system, template, max_new_tokens, do_sample, ...).

    Returns:
        The requests; rows that share a vector and alpha share one :class:`Addition`.

    Example:
        >>> requests(["a", "b"], vector=[v, w], alpha=[1.0, -1.0], max_new_tokens=8)
    """
    n = len(prompts)
    vecs: list[SteeringVector | None] = [vector] * n if vector is None or isinstance(vector, SteeringVector) \
        else list(vector)
    alphas = [float(a) for a in alpha] if isinstance(alpha, Sequence) else [float(alpha)] * n
    if len(vecs) != n or len(alphas) != n:
        raise BackendError(f"{len(vecs)} vectors and {len(alphas)} alphas for {n} prompts; give one of each, "
                           "or one per prompt")
    made: dict[tuple[int, float], Addition] = {}
    out = []
    for p, v, a in zip(prompts, vecs, alphas):
        if v is not None and (id(v), a) not in made:
            made[id(v), a] = Addition(v, a, positions, condition)
        out.append(Request(p, None if v is None else made[id(v), a], **options))
    return out
