#!/usr/bin/env bash
# Set up aniso_fast on a fresh machine: CPU torch first (an unpinned torch would pull CUDA packages),
# then the package and its C++ extension (no build isolation, so it builds against the installed torch).
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # + test tools, Triton (run under its interpreter) and the Fashion-MNIST data
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test,triton,metrics]"; fi
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q "setuptools>=70.1" wheel  # --no-build-isolation builds with what is installed
python -m pip install -q --no-build-isolation -e ".${extras}"
if [[ -n "$extras" ]]; then python -m pip install -q --no-deps k-diffusion==0.1.1.post1 torchdiffeq torchsde trampoline; fi  # solver oracle; with deps it would pull a CUDA torch
if [[ -n "$extras" ]]; then python -m pip install -q --no-deps diffusers==0.42.1 && python -m pip install -q "huggingface_hub>=1.32,<3" importlib_metadata; fi  # scheduler oracle, likewise without torch
if [[ -n "$extras" && ! -d /usr/share/datasets/fashion-mnist ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist); its tests will skip" >&2
  fi
fi
