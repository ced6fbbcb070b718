"""Generation engines behind one seam (:mod:`steerscope.backends.base`).

``base`` holds the :class:`~steerscope.backends.base.Request` record and the ``Engine`` protocol;
``hf`` is Hugging Face ``generate`` in this process (any intervention, context factories included);
``vllm`` drives a vLLM engine that lives in its own Python environment (see docs/vllm.md).
``ss.generate(..., backend=...)`` makes its requests and runs them on :func:`~steerscope.backends.base.engine`.
The files under ``engine/`` run *inside* the vLLM environment and import only torch, safetensors
and vllm; nothing in them imports steerscope.
"""

from steerscope.backends.base import BACKENDS, Addition, BackendError, Engine, Request, engine, requests

__all__ = ["BACKENDS", "Addition", "BackendError", "Engine", "Request", "engine", "requests"]
