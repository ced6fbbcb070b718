"""Generation engines other than Hugging Face ``generate``.

``vllm`` drives a vLLM engine that lives in its own Python environment (see docs/vllm.md):
:func:`steerscope.backends.vllm.generate` is what ``ss.generate(..., backend="vllm")`` calls.
The files under ``engine/`` run *inside* that environment and import only torch, safetensors
and vllm; nothing in them imports steerscope.
"""

BACKENDS = ("hf", "vllm")

__all__ = ["BACKENDS"]
