#!/usr/bin/env bash
# The one script a GPU session runs for the CUDA kernels: install this checkout (no dependencies,
# no network), run the CUDA and kernel tests, run the kernel benchmark. Everything it prints goes to
# $OUT/gpu_check.log (benchmarks/results/ when OUT is unset), with the pytest JUnit XML and the
# benchmark JSON beside it; the JSON also stays in benchmarks/results/. Last, compute-sanitizer's
# memcheck and racecheck over small kernel runs (tests/gpu/sanitizer_smoke.py). Each step has its own
# time limit, under 9 minutes in all at worst (about 5 typically); exits non-zero when a step failed.
#
#   bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out" benchmarks/results
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
failed=0

step() {  # step LIMIT_SECONDS COMMAND...
    local limit=$1
    shift
    echo "== $* (limit ${limit}s, at ${SECONDS}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== exit $rc (at ${SECONDS}s)"
    [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import sys, torch, cupy; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "cupy", cupy.__version__, "gpu", torch.cuda.is_available())' || true

step 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
step 180 python3 -m pytest -q -p no:cacheprovider --junitxml="$out/pytest-gpu.xml" tests/gpu tests/kernels
json="benchmarks/results/kernels-$(python3 -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))' 2>/dev/null || echo gpu)-$(date +%F).json"
step 180 python3 -m gspn_gen.kernels.bench --tune --json "$json"
if [ -f "$json" ] && [ "$(realpath "$out")" != "$(realpath benchmarks/results)" ]; then
    cp "$json" "$out/"
fi
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)"
if [ -n "$sanitizer" ]; then
    step 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 3 \
        python3 tests/gpu/sanitizer_smoke.py
    step 60 "$sanitizer" --tool racecheck --error-exitcode 3 python3 tests/gpu/sanitizer_smoke.py
else
    echo "== compute-sanitizer not found, memcheck and racecheck skipped"
fi
echo "== gpu_check done in ${SECONDS}s, failed=$failed"
exit "$failed"
