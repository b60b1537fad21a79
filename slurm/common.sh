# Shared by train.sbatch, multinode.sbatch and sweep.sh (sourced; not a job script).
#
# run_node CMD...: start CMD (`accelerate launch ... train/main.py ...`) in the background (bash runs a
#   trap only between foreground commands), forward SIGUSR1/SIGTERM to the train/main.py processes
#   under it (Accelerate's launchers would die on USR1), and wait until it has exited.
# run_steps CMD...: the same for `srun ...`, forwarding the signal to the job's steps.
# requeue_if_preempted RUN_DIR: the training left RUN_DIR/PREEMPTED after checkpointing: requeue
#   this job (a job that ends during the grace period is not requeued by Slurm), it resumes with --resume auto.

# Overrides, documented in the README:
#   PROJECT_DIR        this project's folder (default: where sbatch was run)
#   RUNS_DIR           where run folders go (default: $PROJECT_DIR/runs)
#   NPROC_PER_NODE     processes per node (default: the GPUs Slurm gave this node, or 1 without GPUs)
#   ACCELERATE_CONFIG  accelerate config file (default: accelerate_config.yaml, bf16; empty: none)
#   ACCELERATE_ARGS    extra `accelerate launch` flags, e.g. "--mixed_precision no"
#   PYTHON             the interpreter (default: python3 of the environment set up in the script)

PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
RUNS_DIR=${RUNS_DIR:-$PROJECT_DIR/runs}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG-$PROJECT_DIR/accelerate_config.yaml}
PYTHON=${PYTHON:-python3}

gpus_on_node() {
    local n=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    n=${n##*:}  # "gpu:4" or "a100:4" -> 4
    if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    fi
    echo "${n:-0}"
}

procs_per_node() {
    local n=${NPROC_PER_NODE:-$(gpus_on_node)}
    [ "$n" -ge 1 ] 2>/dev/null || n=1
    echo "$n"
}

_descendants() {
    local child
    for child in $(pgrep -P "$1"); do
        echo "$child"
        _descendants "$child"
    done
}

_to_workers() {
    local sig=$1 launcher=$2 p
    echo "$(date +%T) $(hostname -s): got SIG$sig, forwarding to the training processes" >&2
    # Only this job's workers (`python [-u] .../train/main.py ...`), never the launchers between them.
    for p in $(_descendants "$launcher"); do
        if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -Eq '^[^ ]*python[0-9.]* (-u )?[^ ]*train/main\.py'; then
            kill "-$sig" "$p" 2>/dev/null || true
        fi
    done
}

_to_steps() {
    # srun's tasks are not children of this shell: let Slurm deliver the signal to every job step,
    # where each node's run_node passes it on to its own workers.
    echo "$(date +%T) batch script: got SIG$1, signalling the job steps" >&2
    scancel --signal="$1" "$SLURM_JOB_ID" || true
}

run_node() { _run_forwarding _to_workers "$@"; }   # the launcher runs here, on this node
run_steps() { _run_forwarding _to_steps "$@"; }    # srun: the launchers run in job steps

_run_forwarding() {
    local forward=$1 pid status=0
    shift
    "$@" &
    pid=$!
    trap "$forward USR1 $pid" USR1
    trap "$forward TERM $pid" TERM
    # `wait` returns early when a trapped signal arrives: wait again until the launcher is gone.
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" && status=0 || status=$?
    done
    trap - USR1 TERM
    return "$status"
}

requeue_if_preempted() {
    local run_dir=$1
    if [ -f "$run_dir/PREEMPTED" ]; then
        echo "$(date +%T) preempted with a checkpoint in $run_dir: requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID" || true  # already requeued by Slurm (scontrol requeue): fine
        return 0
    fi
    return 1
}

accelerate_launch() {
    # accelerate_launch NUM_MACHINES MACHINE_RANK MAIN_IP PORT -- train/main.py args...
    # (MAIN_IP empty: one machine, no rendezvous)
    local machines=$1 rank=$2 ip=$3 port=$4 nproc
    shift 5
    nproc=$(procs_per_node)
    local args=(-m accelerate.commands.launch -q --num_machines "$machines" --num_processes $((nproc * machines))
                --dynamo_backend no)
    if [ -n "$ACCELERATE_CONFIG" ]; then
        args+=(--config_file "$ACCELERATE_CONFIG")
    else
        args+=(--mixed_precision no)
    fi
    if [ $((nproc * machines)) -gt 1 ]; then
        args+=(--multi_gpu)
    fi
    if [ -n "$ip" ]; then
        args+=(--machine_rank "$rank" --main_process_ip "$ip" --main_process_port "$port" --rdzv_backend c10d)
    fi
    # shellcheck disable=SC2206
    args+=(${ACCELERATE_ARGS:-} "$PROJECT_DIR/train/main.py" "$@")
    echo "$(date +%T) $(hostname -s): $PYTHON ${args[*]}" >&2
    "$PYTHON" "${args[@]}"
}
