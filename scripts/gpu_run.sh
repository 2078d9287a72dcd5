#!/usr/bin/env bash
# The one script to run on a lent GPU machine (one H200; python3 with torch, triton, peft,
# transformers, pytest, pytest-xdist, pytest-timeout, pybind11, cmake, ninja and nvcc
# preinstalled; no network and nothing may be installed, so fastpeft runs from this checkout
# through PYTHONPATH). It answers, in under 8 minutes: are the kernels right in bf16/fp16, and
# which implementation is fastest per shape.
#
#     scripts/gpu_run.sh [RESULTS_DIR]            # default: $OUT when set, else bench_results/
#     scripts/gpu_run.sh --rehearse RESULTS_DIR   # the CPU rehearsal (CI): every step's plumbing
#
# Steps (limits in seconds on the GPU; a step gets the smaller of its limit and the time left
# before TOTAL_BUDGET, less what the steps after it need; a step stopped at its limit gets
# SIGINT, then SIGKILL KILL_AFTER later):
#   env        versions, nvidia-smi, nvcc                                   20  -> env.txt
#   build      CMake build of the optional CUDA extension, when csrc/ has sources and nvcc,
#              cmake, ninja and pybind11 are there (else it says what is missing; the
#              rehearsal only configures)                                    60  -> env.txt
#   tests_gpu  the GPU tests first (GPU_TESTS: tests/test_gpu.py, every file with the gpu
#              marker -- tests/test_cuda_gpu.py, ... --, and the tests of DEVICE_TESTS that
#              put tensors on the GPU there: the LoRA kernels' dropout, hybrid, launch
#              planning and dispatch, the bottleneck adapter's and multi-LoRA's ops, layers,
#              models and serving, the QLoRA op and its dequantization and decode kernels,
#              bitsandbytes' CUDA dequantization): fused, hybrid, bottleneck, multi-LoRA and CUDA C++
#              kernels against float64 (bf16, fp16, fp32 adapters, every gradient, dropout,
#              CUDA graphs, no host sync, determinism), 4 workers, 60 s per test, no -x,
#              skip reasons listed (-rs)                                      240 -> tests.log
#   tests_cpu  beside it, the rest of the suite on CPU tensors (GPU hidden, so the kernels run
#              in Triton's interpreter as in CI), 10 workers, 120 s per test 150 -> tests.log
#   focused    fastpeft bench --focused alone on the machine: F.linear, fused, hybrid, torch
#              path and PEFT on Llama-3-8B shapes first (the ratios RESULTS.md records), then
#              the bottleneck adapter's and multi-LoRA's key shapes (60 s of the budget: fused
#              Triton / CUDA C++ / torch path against AdapterHub's module and the launch floor;
#              against PEFT's mixed batch, a loop, vLLM-style padded ranks and F.linear), the
#              profiler table, and torch.compile's rows last; its own 165 s budget, JSON
#              written even when cut
#                                                                           195 -> focused.json, bench.log
#   tune       fastpeft tune (the command users run): every implementation auto may choose
#              for the LoRA op, the bottleneck adapter and multi-LoRA validated against
#              float64 at odd shapes and at each case, then timed beside the torch path, case
#              by case (each op in turn, training steps first) within its own budget; its
#              report goes into summary.txt (failures, every table entry)   75 -> (summary.txt), bench.log
#   grid       fastpeft bench (end-to-end step, then the LoRA grid, the bottleneck adapter
#              and multi-LoRA grids) with the kernels forced (FASTPEFT_BACKEND=triton): the
#              time left, at least GRID_MIN                                  rest -> bench.json, bench.md, bench.log
#   dispatch   the LoRA dispatch table the package would ship, from the tune step's table
#              (what passed validation here, chosen by its rule), when python -m
#              fastpeft.kernels.lora.dispatch --from-tune can write one       20 -> dispatch.json
#   plan       fastpeft plan --compare: the performance model's estimate beside each focused
#              time, so the first GPU run also checks the model              30 -> (summary.txt)
#   summary    GPU, driver, versions, each step, test counts per group,
#              the focused ratio table, the plan comparison; the plumbing verdict 20 -> summary.txt
# That is at most 8 files, no subfolders. Everything ends by TOTAL_BUDGET (6 3/4 min) plus at most
# 4 x KILL_AFTER: under 8 minutes. Expected on an H200: 2-3.5 min of tests, 3.25 min focused, 1.25 min
# tune, the grid in what is left (none when the tests take their whole limit). The ahead-of-time compile
# check (fastpeft check) is CI's.
#
# Exit status: 0 unless the plumbing failed (a step crashed or could not start, the GPU tests
# did not finish, a result file is missing, more than 8 files); failed tests and benchmark
# cells are results, recorded in summary.txt (fastpeft/bench/run_summary.py).
#
# --rehearse runs the same steps on CPU (the GPU hidden even where there is one): the GPU
# group's files are collected with -m gpu (their gpu-marked tests skip; the others, which would
# run in Triton's interpreter, are deselected), the CPU group runs one quick file, the focused
# benchmark runs
# tiny shapes (--tiny), the grid is stopped by its time guard, the dispatch table is written
# for sm_90 from the rehearsal's tune table (plumbing only), all in about 3 minutes on two cores.
set -u -o pipefail

usage() {
    echo "usage: $0 [RESULTS_DIR] | --rehearse RESULTS_DIR" >&2
    exit 2
}

REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then
    REHEARSE=1
    shift
    [ $# -eq 1 ] || usage
fi
[ $# -le 1 ] || usage
RESULTS_ARG=${1:-${OUT:-bench_results}}
mkdir -p "$RESULTS_ARG" || exit 2
RESULTS=$(cd "$RESULTS_ARG" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export ROOT PY=${PYTHON:-python3} REHEARSE
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: >"$STEPS"
# This run's files, from an earlier run into the same folder too: the summary counts them all.
RESULT_FILES=(summary.txt env.txt tests.log focused.json bench.log bench.json bench.md dispatch.json)
for f in "${RESULT_FILES[@]}"; do rm -f "$RESULTS/$f" "$RESULTS/$f.tmp"; done

# --- limits (seconds) ---------------------------------------------------------------------
# The whole run: 8 minutes less 75 s, room for the SIGKILL grace of the steps that can run to
# their limit (tests, focused, tune, grid: KILL_AFTER each) and for the summary.
TOTAL_BUDGET=405
# Grace after SIGINT before SIGKILL: long enough to write a report and a JSON.
KILL_AFTER=15
# A step not given at least this long is skipped (no Python step does anything useful in less).
MIN_STEP=10
# env: a few commands and one torch import. build: a CMake build of a few .cu files on 16 cores.
ENV_LIMIT=20
BUILD_LIMIT=60
# GPU tests: ~1000 tests (LoRA, bottleneck, multi-LoRA, CUDA C++), each well under a second
# once its kernels are compiled; the Triton JIT (~1-2 s per kernel configuration, a few hundred
# of them) dominates, over 4 processes (it is CPU-bound: 4 of the 16 cores). 60 s per test
# catches a hang (thread method: a blocked CUDA call cannot take a signal).
TESTS_GPU_LIMIT=240
TESTS_GPU_WORKERS=4
TESTS_GPU_PER_TEST=60
# CPU tests: CI's ~6-10 CPU-minutes (3-5 min on 2 workers) over 8 of the 16 cores, one torch
# thread each (the other cores: the GPU group and its compiles). It runs beside the GPU group,
# so its limit keeps it from holding up the focused benchmark; 120 s per test for the slowest
# interpreter and training-parity tests.
TESTS_CPU_LIMIT=150
TESTS_CPU_WORKERS=8
TESTS_CPU_PER_TEST=120
# The focused benchmark's own budget (no cell starts after it) and the step's limit: 30 s more
# for the cell in flight (a torch.compile can take that long) and the JSON.
FOCUSED_BUDGET=165
FOCUSED_GRACE=30
# fastpeft tune's budget (no case starts after it; the odd-shape validation of the three ops
# comes first, its compiles mostly cached by the GPU tests') and the step's grace for the case
# in flight.
TUNE_BUDGET=60
TUNE_GRACE=15
# The grid is skipped with less than this: the end-to-end case alone needs about a minute.
GRID_MIN=30
DISPATCH_LIMIT=20
# The plan records every launch of ~300 planned problems on meta tensors: ~10 s on a free
# machine (measured on the CI VM: ~30 s for a fifth of them on two busy cores).
PLAN_LIMIT=30
SUMMARY_LIMIT=20
# What the steps after the focused benchmark need at the least: dispatch, plan and summary.
FINAL_RESERVE=$((DISPATCH_LIMIT + PLAN_LIMIT + SUMMARY_LIMIT))
# The focused benchmark replays CUDA graphs: a launch there costs ~1-2 us of the GPU's front
# end, not the ~4 us of an eager PyTorch launch that fastpeft plan assumes by default.
PLAN_ARGS=(--launch-us 1.5)
# The GPU group: test_gpu.py, the files with the gpu marker, and the bottleneck and multi-LoRA
# test files that put tensors on the GPU (they name DEVICE or cuda; the others run CPU tensors
# only, which the CPU group covers), each once.
# (Their kernels' tests, tests/kernels/*/, run CPU tensors: the CUDA launchers' on the kernels'
# CPU emulation.)
DEVICE_TESTS=(tests/kernels/test_dropout_mask.py tests/kernels/lora/test_hybrid.py tests/kernels/lora/test_launch_planning.py
    tests/kernels/lora/test_dispatch.py tests/ops/test_bottleneck_*.py tests/ops/test_multi_lora_*.py
    tests/methods/bottleneck/test_*.py tests/methods/lora/test_multi_layer.py tests/serving/test_multi_adapter_model.py
    tests/kernels/quant/test_*.py tests/ops/test_qlora_linear.py)
GPU_MARKED=$(grep -rl -E 'pytest\.mark\.gpu\b' --include='test_*.py' tests | sort)
mapfile -t GPU_TESTS < <(printf '%s\n' tests/test_gpu.py $GPU_MARKED \
    $(grep -l -E '\bDEVICE\b|cuda' "${DEVICE_TESTS[@]}") | awk '!seen[$0]++')
GPU_MARK=()
# The CPU group: the rest, with the GPU hidden (the GPU-only files would only skip).
TESTS_CPU_SELECTION=(tests --ignore=tests/test_gpu_script.py)
for f in $GPU_MARKED; do TESTS_CPU_SELECTION+=(--ignore="$f"); done
GRID_ENV=(FASTPEFT_BACKEND=triton)
FOCUSED_ARGS=()
TUNE_ARGS=()
DISPATCH_ARGS=()
if [ "$REHEARSE" -eq 1 ]; then
    # Two CI cores: the tests take ~30 s (xdist start-up), the tiny focused run ~90 s (mostly
    # torch.compile's C++ builds), tune up to 90 s, the grid is stopped after 40 s to exercise
    # its time guard.
    TOTAL_BUDGET=345
    export CUDA_VISIBLE_DEVICES=""
    TESTS_CPU_WORKERS=2
    TESTS_CPU_SELECTION=(tests/test_backend.py)
    # Collect every GPU-group file; keep only its gpu-marked tests (they skip without CUDA).
    GPU_MARK=(-m gpu)
    FOCUSED_BUDGET=60
    FOCUSED_ARGS=(--tiny)
    # The whole tune pipeline on the CPU (interpreter, tiny shapes, three ops): ~40 s on two
    # cores; a budget under which every case runs on a slow CI machine too.
    TUNE_ARGS=(--rehearse)
    TUNE_BUDGET=90
    GRID_REHEARSAL_LIMIT=40
    # CPU timings carry no architecture: name the one the GPU run would write (and plan for);
    # the tiny shapes match no planned problem, so one op and mode is plumbing enough.
    DISPATCH_ARGS=(--arch sm_90)
    PLAN_ARGS+=(--gpu h100 --ops lora --modes fwd)
fi
DEADLINE=$((SECONDS + TOTAL_BUDGET))

# limit CAP RESERVE: CAP, or less when only that much is left before the deadline after RESERVE.
limit() {
    local left=$((DEADLINE - SECONDS - $2))
    echo $(($1 < left ? $1 : left))
}

# run_step NAME LIMIT LOG COMMAND...: COMMAND under timeout (SIGINT at LIMIT s), its output
# appended to LOG; "NAME status seconds limit" appended to the steps file (status "skipped"
# when LIMIT < MIN_STEP). Returns COMMAND's status (124: stopped at its limit).
run_step() {
    local name=$1 lim=$2 log=$3 start=$SECONDS rc
    shift 3
    if [ "$lim" -lt "$MIN_STEP" ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "$lim" >>"$STEPS"
        echo "[gpu_run] $name: skipped (limit $lim s)"
        return 0
    fi
    echo "[gpu_run] $name: started (limit $lim s, $((DEADLINE - SECONDS)) s left)"
    echo "== $name: $* (limit ${lim}s)" >>"$log"
    timeout --signal=INT --kill-after="$KILL_AFTER" "$lim" "$@" >>"$log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "== $name: stopped at its ${lim} s limit" >>"$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$lim" >>"$STEPS"
    echo "[gpu_run] $name: exit status $rc after $((SECONDS - start)) s"
    return "$rc"
}

show_environment() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    uname -a
    "$PY" --version
    "$PY" - <<'PYEOF'
import importlib.metadata as md
import os
import torch
for name in ("torch", "triton", "peft", "transformers", "pytest", "pytest-xdist", "pytest-timeout", "matplotlib"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
print("cuda available:", torch.cuda.is_available(), "| torch CUDA:", torch.version.cuda,
      "| CUDA_VISIBLE_DEVICES:", os.environ.get("CUDA_VISIBLE_DEVICES"))
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name} | sm_{p.major}{p.minor} | {p.multi_processor_count} SMs | "
          f"{p.total_memory / 2**30:.0f} GiB | L2 {p.L2_cache_size / 2**20:.0f} MiB")
PYEOF
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
}

build_extension() {
    if ! compgen -G "csrc/*.cu" >/dev/null && ! compgen -G "csrc/*.cpp" >/dev/null; then
        echo "csrc/ has no sources: nothing to build; fastpeft is pure Python (PYTHONPATH=$ROOT)"
        return 0
    fi
    # What the build needs; without it the extension is not built (a result, not a plumbing
    # failure: the CUDA C++ rows and tests then report "fastpeft._C was not built").
    local missing=() tool
    for tool in nvcc cmake ninja; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    "$PY" -m pybind11 --cmakedir >/dev/null 2>&1 || missing+=("pybind11 (python module)")
    if [ ${#missing[@]} -gt 0 ]; then
        echo "CUDA extension not built: ${missing[*]} not found"
        return 0
    fi
    cmake -S . -B build/gpu_run -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" || return
    if [ "$REHEARSE" -eq 1 ]; then
        echo "rehearsal: CMake configured the CUDA extension; not compiled (minutes of nvcc on two cores)"
        return 0
    fi
    # Installs fastpeft/_C*.so into the source tree (CMakeLists: install(... DESTINATION fastpeft)).
    cmake --build build/gpu_run && cmake --install build/gpu_run --prefix "$ROOT"
}
export -f show_environment build_extension

# pytest_args NAME WORKERS PER_TEST SELECTION...: sets PYTEST to a pytest command line with its
# own JUnit report ($WORK/junit_NAME.xml), WORKERS xdist workers, PER_TEST seconds per test (the
# thread method: a test blocked in a CUDA call cannot take a signal), and never -x.
pytest_args() {
    local name=$1 workers=$2 per_test=$3
    shift 3
    PYTEST=("$PY" -m pytest -q -p no:cacheprovider -n "$workers" --timeout "$per_test" --timeout-method thread
            --junitxml "$WORK/junit_$name.xml" "$@")
}

# --- the steps ------------------------------------------------------------------------------
run_step env "$(limit "$ENV_LIMIT" 0)" "$RESULTS/env.txt" bash -c show_environment
run_step build "$(limit "$BUILD_LIMIT" 0)" "$RESULTS/env.txt" bash -c build_extension

# The GPU group first and in front; the CPU group beside it with the GPU hidden (its tests
# then run the kernels in Triton's interpreter, as CI does). Both must end before the
# focused benchmark starts, whose timings want the machine to themselves.
tests_reserve=$((FOCUSED_BUDGET / 2 + FINAL_RESERVE))
(
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    pytest_args cpu "$TESTS_CPU_WORKERS" "$TESTS_CPU_PER_TEST" "${TESTS_CPU_SELECTION[@]}"
    run_step tests_cpu "$(limit "$TESTS_CPU_LIMIT" "$tests_reserve")" "$WORK/tests_cpu.log" "${PYTEST[@]}"
) &
cpu_tests=$!
pytest_args gpu "$TESTS_GPU_WORKERS" "$TESTS_GPU_PER_TEST" -rs "${GPU_MARK[@]}" "${GPU_TESTS[@]}"
# cuBLAS's workspace setting for deterministic GEMMs, read once per process (the determinism test).
run_step tests_gpu "$(limit "$TESTS_GPU_LIMIT" "$tests_reserve")" "$RESULTS/tests.log" \
    env CUBLAS_WORKSPACE_CONFIG=:4096:8 "${PYTEST[@]}"
wait "$cpu_tests"
[ -f "$WORK/tests_cpu.log" ] && cat "$WORK/tests_cpu.log" >>"$RESULTS/tests.log"

focused_limit=$(limit $((FOCUSED_BUDGET + FOCUSED_GRACE)) "$FINAL_RESERVE")
# Squeezed by slow tests, the budget keeps the grace, or half the limit when that is short.
focused_budget=$((focused_limit > 2 * FOCUSED_GRACE ? focused_limit - FOCUSED_GRACE : focused_limit / 2))
run_step focused "$focused_limit" "$RESULTS/bench.log" \
    "$PY" -m fastpeft.bench --focused "${FOCUSED_ARGS[@]}" --budget-s "$focused_budget" \
    --json "$RESULTS/focused.json"

tune_limit=$(limit $((TUNE_BUDGET + TUNE_GRACE)) "$FINAL_RESERVE")
run_step tune "$tune_limit" "$RESULTS/bench.log" \
    "$PY" -m fastpeft.cli tune "${TUNE_ARGS[@]}" --time-budget $((tune_limit > 2 * TUNE_GRACE ? tune_limit - TUNE_GRACE : tune_limit / 2)) \
    --out "$WORK/tune" --json "$WORK/tune.json"

grid_limit=$(limit "${GRID_REHEARSAL_LIMIT:-$TOTAL_BUDGET}" "$FINAL_RESERVE")
[ "$grid_limit" -lt "$GRID_MIN" ] && grid_limit=0
run_step grid "$grid_limit" "$RESULTS/bench.log" \
    env "${GRID_ENV[@]}" "$PY" -m fastpeft.bench --json "$RESULTS/bench.json" --markdown "$RESULTS/bench.md"

# The project's dispatch table from what fastpeft tune validated and timed (its choice rule:
# one implementation of "validate, time, choose" for users' tables and the project's).
if [ -f "$WORK/tune.json" ] \
    && "$PY" -m fastpeft.kernels.lora.dispatch --help 2>/dev/null | grep -q -- --from-tune; then
    run_step dispatch "$(limit "$DISPATCH_LIMIT" "$SUMMARY_LIMIT")" "$RESULTS/bench.log" \
        "$PY" -m fastpeft.kernels.lora.dispatch --from-tune "$WORK/tune.json" \
        --out "$RESULTS/dispatch.json" "${DISPATCH_ARGS[@]}"
else
    printf 'dispatch\tskipped\t0\t0\n' >>"$STEPS"
    echo "[gpu_run] dispatch: skipped (no dispatch-table writer, or no tune report)"
fi

if [ -f "$RESULTS/focused.json" ]; then
    run_step plan "$(limit "$PLAN_LIMIT" "$SUMMARY_LIMIT")" "$WORK/plan.txt" \
        "$PY" -m fastpeft.plan.cli --compare "$RESULTS/focused.json" "${PLAN_ARGS[@]}"
else
    printf 'plan\tskipped\t0\t0\n' >>"$STEPS"
    echo "[gpu_run] plan: skipped (no focused.json)"
fi

for f in "${RESULT_FILES[@]}"; do rm -f "$RESULTS/$f.tmp"; done  # a JSON cut mid-write
rehearsal_flag=()
[ "$REHEARSE" -eq 1 ] && rehearsal_flag=(--rehearsal)
timeout --kill-after="$KILL_AFTER" "$SUMMARY_LIMIT" "$PY" -m fastpeft.bench.run_summary --results "$RESULTS" \
    --steps "$STEPS" --junit gpu="$WORK/junit_gpu.xml" --junit cpu="$WORK/junit_cpu.xml" --plan "$WORK/plan.txt" \
    --tune "$WORK/tune.json" \
    "${rehearsal_flag[@]}"
status=$?
echo "[gpu_run] total ${SECONDS} s; summary exit status $status (0: no plumbing problem); results in $RESULTS"
[ "$status" -eq 0 ]
