#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU, a CUDA build of torch and the CUDA toolkit (nvcc):
#   bash scripts/gpu_check.sh
# 1. builds aniso_fast._C with its CUDA kernels (pip install --no-build-isolation --no-deps -e .) and checks that
#    the cuda backend is available;
# 2. runs the op tests on the GPU (pytest --device cuda: the reference, cuda and triton backends against the
#    float64 reference, gradcheck, double backward; tests/conftest.py), Triton compiled (TRITON_INTERPRET=0);
# 3. runs the CUDA cases of the op benchmarks (bench/results/cuda.json) and of the throughput benchmarks (fp32,
#    bf16, bf16 with torch.compile mode reduce-overhead; bench/results/cuda-e2e.json) and writes
#    bench/RESULTS-gpu.md from them.
# Without a GPU it prints one line and exits 1 (nothing was checked). Env: PYTHON (default python), BENCH_BUDGET
# (seconds of timed rounds per benchmark case, default 0.5), STEP_TIMEOUT (seconds per step, default 1800).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${BENCH_BUDGET:-0.5}
STEP=${STEP_TIMEOUT:-1800}

probe="import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))"
if ! gpu=$(timeout 120 "$PY" -c "$probe" 2>/dev/null); then
  echo "gpu_check: no CUDA GPU available to torch (no CUDA torch or no device): nothing checked" >&2
  exit 1
fi
if ! command -v nvcc >/dev/null && [[ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  echo "gpu_check: no nvcc (PATH or CUDA_HOME): the CUDA kernels cannot be built" >&2
  exit 1
fi
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'pytest_benchmark', 'hypothesis', 'triton') if u.find_spec(m) is None))")
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python packages: $missing (bash scripts/setup.sh --test)" >&2
  exit 1
fi
echo "gpu_check: $gpu"

echo "== 1. build the CUDA extension"
timeout "$STEP" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "
from aniso_fast import ops
b = ops.backends()
reason = b['unavailable'].get('cuda', {}).get('cuda')
print('backends:', b['available'], '- default on CUDA:', b['cuda'])
raise SystemExit(f'gpu_check: the cuda backend is unavailable after the build: {reason}' if reason else 0)"

echo "== 2. op tests on the GPU"
export TRITON_INTERPRET=0
timeout "$STEP" "$PY" -m pytest -q -p no:cacheprovider --device cuda -rs \
  tests/test_ops.py tests/test_ops_autograd.py tests/test_block_ops.py tests/test_cuda_compile.py

echo "== 3. benchmarks on the GPU -> bench/RESULTS-gpu.md"
timeout "$STEP" "$PY" bench/report.py --json bench/results/cuda.json --out bench/RESULTS-gpu.md -- \
  -k "cuda or test_bench_device" --aniso-budget "$BUDGET"
timeout "$STEP" "$PY" bench/report.py --e2e --json bench/results/cuda-e2e.json --out bench/RESULTS-gpu.md -- \
  -k "cuda" --aniso-budget "$BUDGET"
echo "gpu_check: done; see bench/RESULTS-gpu.md"
