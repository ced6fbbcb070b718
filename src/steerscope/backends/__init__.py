"""Generation engines behind one seam (:mod:`steerscope.backends.base`).

``base`` holds the :class:`~steerscope.backends.base.Request` record and the ``Engine`` protocol;
``hf`` is Hugging Face ``generate`` in this process (any intervention, context factories included);
``vllm`` drives a vLLM engine that lives in its own Python environment (see docs/vllm.md).
``ss.generate(..., backend=...)`` makes its requests and runs them on :func:`~steerscope.backends.base.engine`.
The files under ``engine/`` run *inside* the engines' environments and import only torch, safetensors
and vllm (or, for ``steerscope_llamacpp_worker.py``, llama_cpp and numpy); nothing in them imports steerscope.
``llamacpp`` drives that llama.cpp worker (control vectors); ``verify`` (``steerscope verify``) checks that a
vector file steers the same on hf, vllm and llamacpp.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "Addition", "BackendError", "Engine", "Request", "engine", "requests"]


def __getattr__(name: str) -> Any:
    """The names of :mod:`steerscope.backends.base`, imported on first use (``base`` imports torch; the
    command line imports ``backends.verify_command`` while it builds its parser, which must stay torch-free)."""
    if name in __all__:
        from steerscope.backends import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
