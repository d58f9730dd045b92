#!/bin/bash
# dev: call B: the real model from the two GGUF parts, then scripts/bench_engine.py
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
cat ~/qk/gguf.part.aa gpu/gguf.part.ab > ~/qk/model.gguf && (cd ~/qk && sha256sum -c $OLDPWD/gpu/gguf.sha256) || echo "MODEL MISSING"
python -m pip install -q --no-deps gpu/gguf-0.19.0-py3-none-any.whl 2>&1 | tail -1
timeout 500 python scripts/bench_engine.py --model ~/qk/model.gguf --parts ${PARTS:-smol llama7b spec} --json-out $OUT/engine.json 2>&1 | grep -v "de-quantizing\|Loading weights" | tail -60
