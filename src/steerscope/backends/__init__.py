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

from steerscope.backends.base import BACKENDS, Addition, BackendError, Engine, Request, engine, requests

__all__ = ["BACKENDS", "Addition", "BackendError", "Engine", "Request", "engine", "requests"]
