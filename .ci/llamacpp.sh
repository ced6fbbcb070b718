#!/usr/bin/env bash
# llama.cpp for the interop check (tests/test_reliability_items.py::test_llama_cpp_agrees_with_the_hf_path,
# benchmarks/check_llamacpp.py). Sourced by .ci/run. Non-fatal: when the build fails the test skips
# and this prints why. llama-cpp-python builds llama.cpp from source (~10 min on 2 idle cores); pip
# keeps the built wheel in its cache, so later runs on the same machine take seconds.
LLAMACPP_VERSION=0.3.36
LLENV="${STEERSCOPE_LLAMACPP_ENV:-$HOME/.cache/steerscope/llamacpp-env}"
LLSRC="${STEERSCOPE_LLAMACPP_SRC:-$HOME/.cache/steerscope/llamacpp-src}"
llamacpp_setup() {
  if ! "$LLENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    python -m venv "$LLENV" && CMAKE_BUILD_PARALLEL_LEVEL=2 "$LLENV/bin/pip" install -q "llama-cpp-python==$LLAMACPP_VERSION" || return 1
  fi
  # llama.cpp's own HF -> GGUF converter, from the same release's source (no code from it is imported here)
  local conv="$LLSRC/llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
  if [ ! -f "$conv" ]; then
    mkdir -p "$LLSRC" && pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMACPP_VERSION" -d "$LLSRC" \
      && tar xzf "$LLSRC/llama_cpp_python-$LLAMACPP_VERSION.tar.gz" -C "$LLSRC" || return 1
  fi
  pip install -q sentencepiece || return 1  # the converter imports it before falling back to the BPE vocab
  export STEERSCOPE_LLAMACPP="$LLENV/bin/python" LLAMACPP_CONVERT="$conv"
}
llamacpp_setup || echo "llama.cpp not available: test_llama_cpp_agrees_with_the_hf_path will skip"
