#!/bin/bash
# dev: call B (after call A parked gpu/gguf.part.aa in ~/qk): GPU tests, the real-model check, the W4A16/W8A16 table
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
cat ~/qk/gguf.part.aa gpu/gguf.part.ab > ~/qk/model.gguf && (cd ~/qk && sha256sum -c $OLDPWD/gpu/gguf.sha256) || echo "MODEL MISSING"
python -m pip install -q --no-deps gpu/gguf-0.19.0-py3-none-any.whl 2>&1 | tail -1
timeout 150 python -m pytest -q tests/test_int_weight_cuda.py 2>&1 | tail -2
timeout 200 python scripts/check_cuda_e2e.py --model ~/qk/model.gguf --recipe recipes/w4a16-rtn.yaml --json-out $OUT/e2e.json > $OUT/e2e.txt 2>&1; echo e2e rc=$?
tail -22 $OUT/e2e.txt
timeout 280 python scripts/bench_kernels.py --kernels fp16 tinygemm w4a16 w8a16 --json-out $OUT/k1.json > $OUT/k1.txt 2>&1; echo bench rc=$?
tail -c 7000 $OUT/k1.txt
