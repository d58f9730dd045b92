#!/bin/bash
# dev: GPU tests of the engine ops and engine, then the 7B-shaped part of scripts/bench_engine.py (no real model needed)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 200 python -m pytest -x -q tests/test_engine_ops.py tests/test_engine_gpu.py 2>&1 | tail -4
timeout 300 python scripts/bench_engine.py --parts llama7b --json-out $OUT/engine7b.json 2>&1 | tail -12
