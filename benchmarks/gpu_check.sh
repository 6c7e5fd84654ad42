#!/usr/bin/env bash
# The device check for a lent CUDA machine, in one short run: the GPU tests of both kernels, then issue 6's GPU
# shapes (bf16, hidden 4096, 8192 tokens) for dense, dropless, dropless_triton and transformers' grouped_mm.
#
# The H200 image has torch and triton but transformers 5.17 (we need >= 5.24), so carry its wheel; here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.24.0
# then, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/modeling 2>&1 | tee "$OUT/tests.log"
timeout 300 python3 benchmarks/moe_layer.py --device cuda --dtype bfloat16 --hidden 4096 --tokens 8192 \
    --shapes 8:2:14336,64:8:1792,16:4:688 --contenders dense,dropless,dropless_triton,grouped_mm \
    --repeats 10 --warmup 3 2>&1 | tee "$OUT/moe_layer.log"
