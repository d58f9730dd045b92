#!/bin/bash
# dev: call A of the engine measurement: park the first GGUF part, the engine GPU tests (then dev/gpu_engine_b.sh)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
mkdir -p ~/qk && cp gpu/gguf.part.aa ~/qk/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 250 python -m pytest -x -q tests/test_engine_gpu.py 2>&1 | tail -2
