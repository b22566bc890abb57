#!/bin/bash
# The GPU figures of issue #18 in one run on a lent GPU (the `device` tool's `run`):
#   bash bench/gpu_check.sh            # writes $OUT/gpu_check.txt (or ./gpu_check.txt)
# The device image lacks grain, ml_collections, tensorflow-datasets and array_record: put their
# wheels in .whl/ first (/work/.library/device/README.md) and name .whl in `carry`.
set -u
out="${OUT:-.}/gpu_check.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit 1
fi
export PYTHONPATH="${PYTHONPATH:-.}"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  # Train step: SigLIP-B/16 + ~1B decoder, 2048 tokens, bf16, cuDNN attention (target MFU >= 55%),
  # beside XLA attention.
  timeout 300 python3 bench/gpu_train.py --baseline
  # Rollout: batch 64, 256 new tokens, then scoring.
  timeout 200 python3 bench/gpu_rollout.py
} 2>&1 | tee "$out"
