#!/bin/bash
# dev: call A of the engine measurement: park the first GGUF part, GPU tests (kernels + engine), path check
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
mkdir -p ~/qk && cp gpu/gguf.part.aa ~/qk/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python -m pytest -x -q tests/test_int_weight_cuda.py tests/test_engine_gpu.py 2>&1 | tail -4
timeout 120 python dev/quick_w4.py 2 4 8 2>&1 | tail -14
