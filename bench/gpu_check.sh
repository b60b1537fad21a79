#!/usr/bin/env bash
# The one command for a GPU machine: the GPU tests and the benchmark, most valuable first, each part with its
# own time budget inside one overall deadline, every result on disk as soon as it is measured.
#
#   bench/gpu_check.sh [RESULTS_DIR]        # default: $OUT if set, else results/gpu-check-<time>
#
# RESULTS_DIR/summary.md says, part by part, what ran, what passed, what was cut and why; it is written
# from the first second on and closed however the script ends. Each part leaves its log (and the pytest
# parts a JUnit file) beside it; the benchmark's rows land in bench-*.md row by row.
#
# Parts, in order (docs/benchmarks.md says what each measures):
#   env           machine, versions, the wheels the machine lacks, a dataset built and decoded  (budget 40 s)
#   cuda-checks   in-process CUDA checks: no host sync in a step, fp16 waits and overflow, the batched
#                 policies on CUDA, GPU residency fallback                                           (60 s)
#   gpu-models    benchmark: train_one_epoch against the model alone, 4 models at 32 and 224 px     (75 s)
#   small-batch   benchmark: seed recipe ms/step eager / compiled / CUDA graphs, its projection      (120 s)
#   runs          short real runs in bf16, fp16 and fp32 with eval-only, a killed run resumed       (120 s)
#   sweep         sweep throughput: the same 4 trials with 1, 2 and 4 workers sharing one GPU       (120 s)
#   rest          the other short runs (compile, CUDA graphs, host-resident, EMA+TTA+SyncBN, AdamW
#                 fp16), then the benchmark's data, policies, loop and service rows           (what is left)
#
# Environment: DEADLINE (seconds for everything, default 420), PARTS (comma-separated subset, default all:
# a second call can run only `rest`), WHEELS (a folder of wheels: only those whose package the machine
# lacks are installed, into a private site-packages), DATASET (a hub-layout CIFAR-10 for the benchmark;
# default: 20,000 generated images). Needs PyTorch with CUDA for the CUDA parts; without CUDA those say
# "skipped: no CUDA" and the rest runs (a rehearsal on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
work=${TMPDIR:-/tmp}/cifar-gpu-check
mkdir -p "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export CIFAR_ACCELERATE_CACHE="$work/decode-cache"
deadline=${DEADLINE:-420}
parts=",${PARTS:-env,cuda-checks,gpu-models,small-batch,runs,sweep,rest},"
summary="$results/summary.md"
started=$(date -u +"%Y-%m-%d %H:%M:%S UTC")

{
    echo "# bench/gpu_check.sh, started $started"
    echo
    echo "Deadline ${deadline} s; results in $results."
    echo
    echo "| part | status | seconds | detail |"
    echo "|---|---|---|---|"
} > "$summary"

note() { echo "| $1 | $2 | $3 | $4 |" >> "$summary"; }

finish() {
    local rc=$?
    echo >> "$summary"
    echo "Ended after $SECONDS s (exit $rc), $(date -u +"%H:%M:%S UTC")." >> "$summary"
    echo "---- $summary"
    cat "$summary"
}
trap finish EXIT
trap 'note "(script)" "cut: stopped by a signal" "$SECONDS" "what ran is above"; exit 124' INT TERM

# The checkout runs as it is, without `pip install -e .`; wheels the machine lacks go into a folder named
# site-packages (dill pickles modules from other folders by value, and `datasets` then cannot fingerprint).
site="$work/site-packages"
if [ -n "${WHEELS:-}" ]; then
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

pytest_detail() {  # the counts pytest printed last, or what it got to
    grep -aE "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)" "$1" | tail -1 | tr -d '=' | sed 's/^ *//' \
        || true
}

# part NAME BUDGET cuda|any COMMAND...: run COMMAND within min(BUDGET, time left), log to NAME.log, note it.
part() {
    local name=$1 budget=$2 needs=$3 left detail status rc t0
    shift 3
    [[ $parts == *",$name,"* ]] || return 0
    left=$((deadline - SECONDS))
    if [ "$needs" = cuda ] && [ "$cuda" != yes ]; then
        note "$name" "skipped: no CUDA" 0 ""; return 0
    fi
    if [ "$left" -lt 15 ]; then
        note "$name" "cut: the overall deadline left ${left} s" 0 "budget ${budget} s"; return 0
    fi
    [ "$budget" = rest ] || [ "$budget" -gt "$left" ] && budget=$left
    t0=$SECONDS
    echo "==== $name (budget ${budget} s, $((deadline - SECONDS)) s left)"
    # SIGINT first: pytest then still writes its JUnit file and summary, the benchmark keeps its rows.
    # The parts' shell functions run in a child shell (exported below), so that timeout can stop them.
    timeout --signal=INT --kill-after=15 "$budget" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$results/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=passed ;;
        124 | 137) status="cut: over its ${budget} s budget" ;;
        *) status="failed (exit $rc)" ;;
    esac
    detail=$(pytest_detail "$results/$name.log")
    if [ -z "$detail" ] && grep -aq '^| ' "$results/$name.log"; then
        detail="$(grep -ac '^| ' "$results/$name.log") benchmark rows"
    fi
    note "$name" "$status" "$((SECONDS - t0))" "$detail"
}

gpu_tests() {  # gpu_tests NAME TEST...: the given tests of tests/, verbose, with a JUnit file
    local name=$1
    shift
    python3 -m pytest "$@" -v -p no:cacheprovider -o addopts="" --durations=0 --junitxml="$results/$name.xml"
}

environment() {
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    if [ -n "${WHEELS:-}" ]; then
        local missing=() have=()
        for wheel in "$WHEELS"/*.whl; do
            local name
            name=$(basename "$wheel" | cut -d- -f1)
            if python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
                have+=("$name")
            else
                missing+=("$wheel")
            fi
        done
        echo "wheels: installing ${#missing[@]} the machine lacks; already there, not shadowed: ${have[*]:-none}"
        if [ "${#missing[@]}" -gt 0 ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
                "${missing[@]}" || { echo "could not install the wheels in $WHEELS"; return 2; }
        fi
    fi
    python3 bench/env_check.py "$work/data" "${DATASET:-}"
}

cuda=no
export results work site cuda
export -f environment gpu_tests
part env 60 any environment
grep -q "^CUDA: " "$results/env.log" && ! grep -q "^CUDA: none" "$results/env.log" && cuda=yes
grep -q "^dataset " "$results/env.log" 2>/dev/null || {
    note "(script)" "stopped: the environment part failed" "$SECONDS" "see env.log"; exit 2; }
cp "$results/env.log" "$results/machine.txt"
export bench_dataset=${DATASET:-$work/data}

part cuda-checks 60 cuda gpu_tests cuda-checks tests/test_gpu.py -m "gpu and not slow" tests/test_policies.py
part gpu-models 75 cuda python3 bench/bench.py --dataset "$bench_dataset" --repeats 3 --sections gpu-models \
    --out "$results/bench-gpu-models.md"
part small-batch 120 cuda python3 bench/bench.py --dataset "$bench_dataset" --repeats 3 --sections small-batch \
    --out "$results/bench-small-batch.md"
run=tests/test_gpu.py::test_a_short_run_on_the_gpu
part runs 120 cuda gpu_tests runs "$run[bf16]" "$run[fp16]" "$run[fp32]" tests/test_gpu.py::test_a_killed_gpu_run_resumes
sweep_throughput() {
    python3 -c "import optuna" 2>/dev/null || {
        echo "no optuna: add its wheels to WHEELS (docs/benchmarks.md)"; return 3; }
    python3 bench/sweep_throughput.py --dataset "$bench_dataset" --out "$results/bench-sweep.md"
}
export -f sweep_throughput
part sweep 120 cuda sweep_throughput
rest() {
    local status=0
    if [ "$cuda" = yes ]; then
        local run=tests/test_gpu.py::test_a_short_run_on_the_gpu
        gpu_tests rest "$run[compile]" "$run[cuda-graphs]" "$run[host-resident]" "$run[ema-tta-syncbn]" \
            "$run[fp16-adamw]" || status=1
    fi
    local size=(--repeats 3 --steps 30)
    [ "$cuda" = yes ] || size=(--repeats 1 --steps 10)  # a rehearsal on a CPU: that it runs, not how fast
    python3 bench/bench.py --dataset "$bench_dataset" "${size[@]}" --sections decode,data,policies,loop,service \
        --out "$results/bench-rest.md" || status=1
    return $status
}
export -f rest
part rest rest any rest
