#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see /work/.library/device): the image there has
# torch, timm, h5py and safetensors, so the library imports straight from the checkout.
# Usage (device tool): bash benchmarks/gpu.sh        -> $OUT/gpu.json and the log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 540 python3 -m benchmarks.bench_gpu --iters 20 --out "${OUT:-benchmarks/out}" \
    2>&1 | tee "${OUT:-benchmarks/out}/gpu.log"
