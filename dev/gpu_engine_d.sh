#!/bin/bash
# dev: engine-op tests, the 7B decode-step kernel profile, and the 7B-shaped timing
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
timeout 120 python -m pytest -x -q tests/test_engine_ops.py 2>&1 | tail -2
timeout 200 python dev/profile_engine.py 2>&1 | grep -v Warning | tail -32
timeout 250 python scripts/bench_engine.py --parts llama7b --json-out $OUT/engine7b.json 2>&1 | tail -8
