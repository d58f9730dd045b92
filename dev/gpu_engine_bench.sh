#!/bin/bash
# dev: call B after dev/gpu_engine_a.sh parked the first GGUF part (carry gpu/gguf.part.ab gpu/gguf.sha256
# gpu/gguf-0.19.0-py3-none-any.whl): scripts/bench_engine.py, every part, on the real SmolLM2.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
cat ~/qk/gguf.part.aa gpu/gguf.part.ab > ~/qk/model.gguf && (cd ~/qk && sha256sum -c $OLDPWD/gpu/gguf.sha256) || echo "MODEL MISSING"
python -m pip install -q --no-deps gpu/gguf-0.19.0-py3-none-any.whl 2>&1 | tail -1
timeout 560 python scripts/bench_engine.py --model ~/qk/model.gguf ${PARTS:+--parts $PARTS} --json-out $OUT/bench_engine.json 2>&1 | grep -v Warn | tee $OUT/bench_engine.txt
