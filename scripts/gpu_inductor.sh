#!/usr/bin/env bash
# The AOTInductor backend on a CUDA GPU host, in one go: build, verify, bench.
#
#   scripts/gpu_inductor.sh WORK_DIR OUT_DIR [model options, default --random-init]
#
# Installs the wheels carried in .whl/ (diffusers, importlib_metadata, polygraphy) into /tmp/site
# when diffusers is missing, then (env STATIC_SPEC, default vaebuild/builder/profiles/all_static.yaml: all 14 sizes;
# JOBS, default 8: parallel compiles per build):
#   1. builds, concurrently: WORK/static (weight-free packages + weights.safetensors), WORK/embedded
#      (the same with --embed-weights: the twins), WORK/multi (one dynamic package per graph for the
#      nine I2I profiles);
#   2. `vaebuild verify` of WORK/static against fp32 diffusers (OUT/verify_static.json), the fine-tune
#      weights check (benchmarks/checks/weights_swap_check.py) and diffusers' QwenImagePipeline decode step with
#      the stock VAE and EngineVae (OUT/diffusers_pipeline_bench.{json,md});
#   3. one `vaebuild bench` run with the three folders (OUT/inductor_bench.{json,md});
#   4. `vaebuild verify` of the other folders (env VERIFY_MORE, default "multi").
# Each stage appends to OUT/gpu_inductor.log; a failed stage is logged and the next ones still run.
set -uo pipefail
work=${1:?usage: scripts/gpu_inductor.sh WORK_DIR OUT_DIR [model options]}
out=${2:?usage: scripts/gpu_inductor.sh WORK_DIR OUT_DIR [model options]}
shift 2
model=("$@")
[[ ${#model[@]} -eq 0 ]] && model=(--random-init)
repo=$(cd "$(dirname "$0")/.." && pwd)
spec=${STATIC_SPEC:-$repo/vaebuild/builder/profiles/all_static.yaml}
jobs=${JOBS:-8}
mkdir -p "$work" "$out"
log="$out/gpu_inductor.log"
if ! python3 -c "import diffusers, polygraphy" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$repo"/.whl/*.whl
fi
export PYTHONPATH=$repo:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
vaebuild() { python3 -m vaebuild "$@"; }
stage() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"

stage "build: static, embedded twins and multi-profile, concurrently"
start=$SECONDS
vaebuild static --backend inductor "${model[@]}" --spec "$spec" --out "$work/static" --jobs "$jobs" \
  >"$work/build_static.log" 2>&1 &
vaebuild static --backend inductor "${model[@]}" --spec "$spec" --out "$work/embedded" --embed-weights \
  --jobs "$jobs" >"$work/build_embedded.log" 2>&1 &
vaebuild multiprofile --backend inductor "${model[@]}" ${MULTI_SPEC:+--spec "$MULTI_SPEC"} --out "$work/multi" \
  --jobs 2 >"$work/build_multi.log" 2>&1 &
wait
stage "builds done in $((SECONDS - start)) s"
cat "$work"/build_*.log >>"$log"

stage "verify static"
vaebuild verify "$work/static" --report "$out/verify_static.json" 2>&1 | tail -n 40 | tee -a "$log"
stage "fine-tune weights check"
python3 "$repo/benchmarks/checks/weights_swap_check.py" "$work/static" 2>&1 | tail -n 3 | tee -a "$log"
stage "diffusers pipeline decode step"
python3 "$repo/benchmarks/packages/diffusers_pipeline_bench.py" --engines "$work/static" --out "$out" 2>&1 | tail -n 20 | tee -a "$log"

stage "bench"
vaebuild bench "${model[@]}" ${SIZES:+--sizes "$SIZES"} --engines "$work/static" --engines "$work/embedded" \
  --engines "$work/multi" --json "$out/inductor_bench.json" --markdown "$out/inductor_bench.md" 2>&1 \
  | tee -a "$log" | tail -n 60
for folder in ${VERIFY_MORE-multi}; do
  stage "verify $folder"
  vaebuild verify "$work/$folder" --report "$out/verify_$folder.json" 2>&1 | tail -n 40 | tee -a "$log"
done
stage "done"
