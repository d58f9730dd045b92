#!/bin/bash
# dev: call A of the engine measurement: park the first GGUF part, the GPU tests (kernels + engine), the TTFT probe
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
mkdir -p ~/qk && cp gpu/gguf.part.aa ~/qk/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 250 python -m pytest -x -q tests/test_engine_ops.py tests/test_engine_gpu.py tests/test_int_weight_cuda.py 2>&1 | tail -2
timeout 120 python dev/ttft_probe.py > $OUT/ttft.txt 2>&1; grep -A1 "prompt lengths" $OUT/ttft.txt
