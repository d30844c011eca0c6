#!/usr/bin/env bash
# The GPU check of the GSPN CUDA kernels, one command on a machine with an NVIDIA GPU (sm_80+; the cluster
# variant needs sm_90, H100/H200):
#
#   bash benchmarks/gpu_check.sh
#
# Steps, in this order, each under its own time limit and all within GSPN_CHECK_SECONDS (default 360):
#   1. install    this checkout into the machine's Python (no dependencies, no network)            <= 30 s
#   2. smoke      benchmarks/gpu_smoke.py (torch + CuPy only): compile every variant, check forward and
#                 backward at three small shapes against the PyTorch backend, time the target shapes
#                 and the copy bandwidth; its JSON is written after every row                       <= 90 s
#                 (no usable GPU: the check stops here)
#   3. bench      benchmarks/kernel_bench.py: both variants, the per-column baseline and SDPA at the
#                 four bf16 target shapes and 4x64x64 in fp32, beside the design figures (JSON + plot) <= 75 s
#   4. tests      tests/gpu with GSPN_REQUIRE_CUDA=1 (a skipped GPU test fails) and --maxfail=5      <= 80 s
#   5. memcheck   compute-sanitizer memcheck over tests/gpu/sanitizer_smoke.py --reduced          <= 60 s
#   6. e2e        benchmarks/e2e.py with the time left: GSPN-XL/2 (cluster), DiT-XL/2 and GSPN-XL/2 on
#                 the portable variant, training 256 px x 32 and 512 px x 8, forward at 256-2048 px
# Everything goes to $OUT (benchmarks/results/gpu-check-<date> when OUT is unset): gpu_check.log, smoke.json,
# the benchmark JSON and plot, the tests' JUnit XML, the end-to-end JSON; each step's files are copied to
# benchmarks/results/ as soon as the step ends, whatever the later steps do.
# Exit status: 0 only when every step ran and passed; 3 when the smoke step found no usable GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-check-$(date +%F)}"
mkdir -p "$out" benchmarks/results
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
budget="${GSPN_CHECK_SECONDS:-360}"
failed=0
passed=()

left() { echo $((budget - SECONDS)); }

step() {  # step NAME LIMIT_SECONDS COMMAND...: run under min(LIMIT, time left - 5)
    local name=$1 limit=$2
    shift 2
    local room=$(($(left) - 5))
    if [ "$room" -lt "$limit" ]; then limit=$room; fi
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, no time left (at ${SECONDS}s of ${budget}s)"
        failed=1
        return 1
    fi
    echo "== $name (limit ${limit}s, at ${SECONDS}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== $name: did not finish within ${limit}s"
    fi
    echo "== $name: exit $rc (at ${SECONDS}s)"
    if [ "$rc" -eq 0 ]; then passed+=("$name"); else failed=1; fi
    return "$rc"
}

keep() {  # copy a finished step's files to benchmarks/results (missing ones are fine)
    for f in "$@"; do [ -e "$f" ] && cp -f "$f" benchmarks/results/; done
    return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' || true
step install 30 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || true
gpu="$(python3 -c 'import torch; from gspn_gen.report import slug; print(slug(torch.cuda.get_device_name()))' 2>/dev/null || echo gpu)"

step smoke 90 python3 benchmarks/gpu_smoke.py --json "$out/smoke-$gpu.json" --max-seconds 80
smoke=$?
keep "$out/smoke-$gpu.json"
if [ "$smoke" -eq 3 ]; then
    echo "== gpu_check: stopped, no usable GPU (see the smoke step), ${SECONDS}s"
    exit 3
fi

step bench 75 python3 benchmarks/kernel_bench.py --max-seconds 55 --json "$out/kernels-$gpu.json"
keep "$out/kernels-$gpu.json" "$out/kernels-$gpu.png"

step tests 80 env GSPN_REQUIRE_CUDA=1 python3 -m pytest -q -p no:cacheprovider --maxfail=5 \
    --junitxml="$out/pytest-gpu-$gpu.xml" tests/gpu
keep "$out/pytest-gpu-$gpu.xml"

sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ]; then
    step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 3 \
        python3 tests/gpu/sanitizer_smoke.py --reduced
else
    echo "== memcheck: compute-sanitizer not found, memcheck did not run"
    failed=1
fi

# End-to-end benchmark (benchmarks/e2e.py) with the time left: the eager cells of the DESIGN.md targets,
# GSPN-XL/2 and DiT-XL/2 first, then GSPN-XL/2 on the portable variant; no sampling, profile or compiled pass.
e2e_limit=$(($(left) - 10))
e2e_measure=$((e2e_limit - 25))
if [ "$e2e_measure" -lt 5 ]; then e2e_measure=5; fi
step e2e "$e2e_limit" python3 benchmarks/e2e.py --presets GSPN-XL/2 DiT-XL/2 GSPN-XL/2:gspn_backend=cuda-portable \
    --train 256x32 512x8 --resolutions 256 512 1024 2048 --sample --profile --no-compile --steps 3 \
    --max-seconds "$e2e_measure" --json "$out"
keep "$out"/e2e-*.json "$out"/e2e-*.png

echo "== gpu_check done in ${SECONDS}s of ${budget}s: passed ${passed[*]:-nothing}; $([ "$failed" -eq 0 ] && echo passed || echo FAILED)"
exit "$failed"
