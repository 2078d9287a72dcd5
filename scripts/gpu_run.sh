#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H200; python3 with torch, triton, peft,
# pytest, pybind11, cmake, ninja, nvcc preinstalled; no network, so nothing is downloaded).
#
#     scripts/gpu_run.sh [RESULTS_DIR]     # default: $OUT when set, else bench_results/
#
# Steps, each under `timeout`; `check` (CPU-bound) runs beside `tests` (GPU-bound), the others
# one after another, so the worst case is 20 + 60 + 150 + 250 s = 8 min (plus 15 s of
# SIGKILL grace per step that ignores SIGINT). A step that fails or times out does not stop
# the next ones; the exit status is 1 when any step failed.
#   env     versions, nvidia-smi                                  -> env.txt
#   build   CMake build of the optional CUDA extension into the tree
#           when csrc/ has sources (fastpeft is imported through PYTHONPATH)  -> env.txt
#   tests   python3 -m pytest tests -m "not slow" -x -q (on the GPU)        -> tests.log
#   check   fastpeft check --arch sm_90                           -> check.log
#   bench   fastpeft bench alone on the machine: the end-to-end   -> bench.log, bench.json,
#           training step (~1.1B Llama, fastpeft vs PEFT), then      bench.md, bench.png
#           the full GPU grid                                        (e2e in its own sections)
# and summary.txt (each step's exit status and seconds): 8 files, no subfolders.
set -u -o pipefail

RESULTS_ARG=${1:-${OUT:-bench_results}}
mkdir -p "$RESULTS_ARG"
RESULTS=$(cd "$RESULTS_ARG" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The Triton kernels are opt-in on CUDA until a run of this script has validated them
# (fastpeft/backend.py, KERNELS_VALIDATED_ON_GPU): this run opts in, for the tests and the
# benchmark's fastpeft rows alike.
export FASTPEFT_BACKEND=triton

# Seconds per step. env: a few commands. build: a CMake build of a few .cu files on 16 cores.
# tests: the non-slow suite with real kernels. check: ~430 kernel configurations at ~5 CPU-s
# each (measured on the 2-core dev machine) over CHECK_JOBS processes. bench: the end-to-end
# case first (~1 min estimated, not yet run on a GPU: building the 1.1B model and its twin,
# ~15 training steps of 16k tokens per model, fastpeft's kernel JIT), then the full grid (~600
# timings, ~12 torch.compile graphs) in the rest; on timeout it gets SIGINT and still writes
# what it measured (the grid cut short rank by rank, the end-to-end case already complete).
ENV_TIMEOUT=20
BUILD_TIMEOUT=60
TESTS_TIMEOUT=120
CHECK_TIMEOUT=150
BENCH_TIMEOUT=250
# Grace after SIGINT before SIGKILL: long enough to write the report, JSON and plot.
KILL_AFTER=15
# Compile processes for check: 12 of the 16 cores, leaving 4 to the GPU tests beside it.
CHECK_JOBS=12

show_environment() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    "$PY" --version
    "$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
for name in ("torch", "triton", "peft", "transformers", "pytest", "pytest-benchmark", "matplotlib", "rich"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
print("cuda available:", torch.cuda.is_available(), "| torch CUDA:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| capability:", torch.cuda.get_device_capability(0))
PYEOF
    nvidia-smi
    nvcc --version | tail -n 2
}

build_extension() {
    if ! compgen -G "csrc/*.cu" >/dev/null && ! compgen -G "csrc/*.cpp" >/dev/null; then
        echo "csrc/ has no sources: nothing to build; fastpeft is pure Python (PYTHONPATH=$ROOT)"
        return 0
    fi
    # Installs fastpeft/_C*.so into the source tree (CMakeLists: install(... DESTINATION fastpeft)).
    cmake -S . -B build/gpu_run -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
        && cmake --build build/gpu_run \
        && cmake --install build/gpu_run --prefix "$ROOT"
}

run_tests() { "$PY" -m pytest tests -m "not slow" -x -q; }
run_check() { "$PY" -m fastpeft.cli check --arch sm_90 --jobs "$CHECK_JOBS"; }
run_bench() { "$PY" -m fastpeft.bench --out "$RESULTS"; }
export ROOT RESULTS CHECK_JOBS
export -f show_environment build_extension run_tests run_check run_bench

# run_step NAME LIMIT_S LOG FUNCTION: run FUNCTION under timeout, append its output to LOG,
# record "NAME rc seconds" in summary.txt; returns FUNCTION's status (124: timed out).
run_step() {
    local name=$1 limit=$2 log=$3 fn=$4 start=$SECONDS rc
    echo "== $name ($fn, timeout ${limit}s)" >>"$log"
    timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" bash -c "$fn" >>"$log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "== $name: timed out after ${limit}s" >>"$log"
    printf '%-6s rc=%-3s %4ss  -> %s\n' "$name" "$rc" "$((SECONDS - start))" "$(basename "$log")" \
        | tee -a "$RESULTS/summary.txt"
    return "$rc"
}

failures=0
: >"$RESULTS/summary.txt"
run_step env "$ENV_TIMEOUT" "$RESULTS/env.txt" show_environment || failures=$((failures + 1))
run_step build "$BUILD_TIMEOUT" "$RESULTS/env.txt" build_extension || failures=$((failures + 1))
run_step check "$CHECK_TIMEOUT" "$RESULTS/check.log" run_check &
check_pid=$!
run_step tests "$TESTS_TIMEOUT" "$RESULTS/tests.log" run_tests || failures=$((failures + 1))
wait "$check_pid" || failures=$((failures + 1))
run_step bench "$BENCH_TIMEOUT" "$RESULTS/bench.log" run_bench || failures=$((failures + 1))
echo "failed steps: $failures (total ${SECONDS}s); results in $RESULTS" | tee -a "$RESULTS/summary.txt"
[ "$failures" -eq 0 ]
