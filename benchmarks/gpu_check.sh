#!/usr/bin/env bash
# The GPU check of the GSPN CUDA kernels, one command on a machine with an H100/H200:
#
#   bash benchmarks/gpu_check.sh
#
# Steps, each under its own time limit and all within GSPN_CHECK_SECONDS (default 360) in total:
#   1. install this checkout into the machine's Python (no dependencies, no network);
#   2. preflight (benchmarks/gpu_preflight.py): GPU visible, sm_90, CuPy, NVRTC compiles a kernel; then
#      every kernel compiled (registers and local memory printed) -- a failure here stops the check;
#   3. the CUDA tests (tests/gpu) with GSPN_REQUIRE_CUDA=1, so a skipped GPU test fails the check, and -x;
#   4. the kernel benchmark (benchmarks/kernel_bench.py) at the four bf16 target shapes and 4x64x64 in fp32 (JSON + PNG plot);
#   5. the end-to-end benchmark (benchmarks/e2e.py) with whatever time is left, at most 170 s;
#   6. compute-sanitizer memcheck and racecheck over small runs of every kernel path (last: slow, and
#      the step most likely to hit its limit);
#   7. with GSPN_TUNE=1 and time left: the benchmark's launch-settings sweep.
# Everything goes to $OUT (benchmarks/results/gpu-check-<date> when OUT is unset): gpu_check.log, the
# pytest JUnit XML, the benchmark JSON and plot, the end-to-end JSON; those results are also copied to
# benchmarks/results/.
# Exit status: 0 only when every step ran and passed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-check-$(date +%F)}"
mkdir -p "$out" benchmarks/results
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
budget="${GSPN_CHECK_SECONDS:-360}"
failed=0

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
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' || true

step install 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || true
if ! step preflight 150 python3 benchmarks/gpu_preflight.py; then
    echo "== gpu_check: stopped at the preflight (see the error above), ${SECONDS}s"
    exit 3
fi

step tests 120 env GSPN_REQUIRE_CUDA=1 python3 -m pytest -x -q -p no:cacheprovider \
    --junitxml="$out/pytest-gpu.xml" tests/gpu

name="kernels-$(python3 -c 'import torch; from gspn_gen.report import slug; print(slug(torch.cuda.get_device_name()))')"
step bench 90 python3 benchmarks/kernel_bench.py --max-seconds 60 --json "$out/$name.json"
cp -f "$out/$name.json" "$out/$name.png" benchmarks/results/ 2>/dev/null

# End-to-end benchmark: owned by benchmarks/e2e.py; keep this line in step with its command line.
e2e_limit=$(($(left) - 60))
if [ "$e2e_limit" -gt 170 ]; then e2e_limit=170; fi
e2e_measure=$((e2e_limit - 30))
if [ "$e2e_measure" -lt 5 ]; then e2e_measure=5; fi
step e2e "$e2e_limit" python3 benchmarks/e2e.py --max-seconds "$e2e_measure" --json "$out"
cp -f "$out"/e2e-*.json benchmarks/results/ 2>/dev/null

sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ]; then
    step memcheck 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 3 \
        python3 tests/gpu/sanitizer_smoke.py
    step racecheck 30 "$sanitizer" --tool racecheck --error-exitcode 3 python3 tests/gpu/sanitizer_smoke.py
else
    echo "== compute-sanitizer not found: memcheck and racecheck did not run"
    failed=1
fi

if [ "${GSPN_TUNE:-0}" = 1 ] && [ "$(left)" -gt 60 ]; then
    step tune $(($(left) - 10)) python3 benchmarks/kernel_bench.py --no-baselines --tune --max-seconds 10 \
        --tune-seconds $(($(left) - 40)) --shapes 4x64x64 1x128x128 --json "$out/$name-tune.json"
fi

echo "== gpu_check done in ${SECONDS}s of ${budget}s: $([ "$failed" -eq 0 ] && echo passed || echo FAILED)"
exit "$failed"
