#!/usr/bin/env bash
# The CUDA checks and the GPU benchmark, for a machine with a GPU (fits in 8 minutes on an H200):
#   bash benchmarks/gpu.sh
# Needs the test dependencies (README) and a CUDA build of torch 2.13 on that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name())"
timeout 300 python -m pytest -q -m "slow or not slow" tests/test_cuda.py tests/test_compiled.py
timeout 240 python benchmarks/gpu_decode.py "$@"
