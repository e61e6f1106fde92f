#!/usr/bin/env bash
# Every training stage of aniso_fast/recipes/fmnist.json, in order, then the shipped models (aniso_fast/assets/).
# Rerunnable: a finished stage is skipped, a started one continues with --resume. Then the table:
#   python -m aniso_fast.evaluate table --recipe fmnist
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m aniso_fast.evaluate train-recipe --recipe fmnist "$@"
