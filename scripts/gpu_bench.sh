#!/usr/bin/env bash
# Run `vaebuild bench` on a GPU machine that has PyTorch but neither vaebuild nor diffusers installed.
#
#   scripts/gpu_bench.sh OUT_DIR [bench options...]
#
# Wheels in .whl/ (diffusers, importlib_metadata, polygraphy: see benchmarks/README.md) are installed
# into /tmp/site when diffusers is not importable. Results: OUT_DIR/vae_bench.{json,md,log}.
# Default options: --random-init (pass --model PATH instead for real weights).
set -euo pipefail
out=${1:?usage: scripts/gpu_bench.sh OUT_DIR [bench options...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$out"
args=("$@")
if [[ ! " ${args[*]-} " =~ " --model " && ! " ${args[*]-} " =~ " --random-init " ]]; then
  args+=(--random-init)
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 "$repo/scripts/bench.py" "${args[@]}" \
  --json "$out/vae_bench.json" --markdown "$out/vae_bench.md" 2>&1 | tee "$out/vae_bench.log"
