# Shared by train.sbatch, multinode.sbatch and sweep.sh (sourced; not a job script).
#
# run_node CMD...: start CMD (`accelerate launch ... train/main.py ...`) in the background (bash runs a
#   trap only between foreground commands) with USR1 ignored by the launchers (torch's elastic agent
#   would die of it), forward SIGUSR1/SIGTERM to the training processes under it, which register
#   their pids in CIFAR_ACCELERATE_PID_DIR, and wait until it has exited.
# run_steps CMD...: the same for `srun ...`, forwarding the signal to every process of the job's steps.
# clear_stale_marker RUN_DIR: before training, drop a PREEMPTED or STALLED marker left by an earlier attempt.
# requeue_if_preempted RUN_DIR STATUS: this attempt's training left RUN_DIR/PREEMPTED after
#   checkpointing, or RUN_DIR/STALLED after a stall (train/stall.py: no progress for --stall-timeout, or a
#   process gone): requeue this job (a job that ends during the grace period is not requeued by Slurm),
#   at most MAX_REQUEUES times; it resumes with --resume auto. A run that stalled twice at the same step is
#   not requeued again: that hang is not a one-off. Says in the log why it did or did not.
# requeue_job WHY: the requeue itself (sweep.sh: a worker that stopped its trial at a checkpoint, exit 75).

# Overrides, documented in the README:
#   PROJECT_DIR        this project's folder (default: where sbatch was run)
#   RUNS_DIR           where run folders go (default: $PROJECT_DIR/runs)
#   NPROC_PER_NODE     processes per node (default: the GPUs Slurm gave this node, or 1 without GPUs)
#   ACCELERATE_CONFIG  accelerate config file (default: accelerate_config.yaml, bf16; empty: none)
#   ACCELERATE_ARGS    extra `accelerate launch` flags, e.g. "--mixed_precision no"
#   PYTHON             the interpreter (default: python3 of the environment set up in the script)
#   ENTRY              what `accelerate launch` runs (default: $PROJECT_DIR/train/main.py; or "-m train.main")
#   MAX_REQUEUES       requeues after preemption before a job gives up (default 5; SLURM_RESTART_COUNT counts)

PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
RUNS_DIR=${RUNS_DIR:-$PROJECT_DIR/runs}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG-$PROJECT_DIR/accelerate_config.yaml}
PYTHON=${PYTHON:-python3}
# The job imports this project's `train` package, whichever checkout the environment has installed.
export PYTHONPATH=$PROJECT_DIR${PYTHONPATH:+:$PYTHONPATH}

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

_PENDING_SIGNAL="" _SIGNALLED=" "

_to_workers() {
    # Only the training processes: each one wrote its pid into CIFAR_ACCELERATE_PID_DIR when it started
    # (train/preemption.py), whatever the launch command. The launchers ignore USR1 (see _run_forwarding).
    # A sweep worker (train/sweep.py) registers too, and passes the signal on to its trial's processes.
    local launcher=$1 p below
    below=$(echo "$launcher"; _descendants "$launcher")  # the launcher itself: bash may exec the worker
    for p in $(ls "$CIFAR_ACCELERATE_PID_DIR" 2>/dev/null); do
        case "$_SIGNALLED" in *" $p "*) continue ;; esac
        if grep -qx "$p" <<<"$below"; then  # a pid file of this launcher's worker, not a reused pid
            kill "-$_PENDING_SIGNAL" "$p" 2>/dev/null && _SIGNALLED+="$p "
        fi
    done
}

_on_signal() {
    local sig=$1 forward=$2 launcher=$3 where=${SLURMD_NODENAME:-$(hostname -s)}
    if [ "$forward" = _to_steps ]; then
        echo "$(date +%T) batch script on $where: got SIG$sig, signalling the job steps" >&2
    else
        echo "$(date +%T) $where: got SIG$sig, forwarding to the training processes" >&2
    fi
    _PENDING_SIGNAL=$sig
    "$forward" "$launcher"
}

_to_steps() {
    # srun's tasks are not children of this shell: Slurm delivers the signal to every process of every
    # job step; each node's run_node passes it on to its own workers, its launchers ignore it.
    scancel --signal="$_PENDING_SIGNAL" "$SLURM_JOB_ID" || true
    _PENDING_SIGNAL=""
}

run_node() { _run_forwarding _to_workers "$@"; }   # the launcher runs here, on this node
run_steps() { _run_forwarding _to_steps "$@"; }    # srun: the launchers run in job steps

_run_forwarding() {
    local forward=$1 pid status=0
    shift
    CIFAR_ACCELERATE_PID_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cifar-accelerate-workers.XXXXXX")
    export CIFAR_ACCELERATE_PID_DIR
    # USR1 ignored from here down: torch's elastic agent (inside `accelerate launch`) would die of it
    # (`scancel --signal` reaches every process of a step); the workers install their own handler.
    (trap '' USR1; "$@") &
    pid=$!
    trap "_on_signal USR1 $forward $pid" USR1
    trap "_on_signal TERM $forward $pid" TERM
    # Poll rather than `wait $pid`: a signal that came before a worker registered its pid is delivered
    # once it has (a worker ignores USR1 until then, so nothing is lost).
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1 & wait $! || true
        [ -z "$_PENDING_SIGNAL" ] || "$forward" "$pid"
    done
    wait "$pid" || status=$?
    trap - USR1 TERM
    rm -rf "$CIFAR_ACCELERATE_PID_DIR"
    return "$status"
}

MAX_REQUEUES=${MAX_REQUEUES:-5}

clear_stale_marker() {
    # A marker left by an earlier attempt must not requeue this one if it fails before training.
    local run_dir=$1 marker
    for marker in PREEMPTED STALLED; do
        if [ -f "$run_dir/$marker" ]; then
            echo "$(date +%T) removing $run_dir/$marker of an earlier attempt ($(cat "$run_dir/$marker"))" >&2
            rm -f "$run_dir/$marker"
        fi
    done
}

requeue_if_preempted() {
    # RUN_DIR STATUS: requeue only for a marker this attempt wrote, at most MAX_REQUEUES times; say why.
    local run_dir=$1 status=$2 attempt="slurm job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}" times where
    if [ -f "$run_dir/STALLED" ] && grep -q "; $attempt\$" "$run_dir/STALLED"; then
        where=$(cut -d';' -f1 "$run_dir/STALLED")  # "stalled at step N (K times at this step)"
        times=$(sed -n 's/.*(\([0-9]*\) times\{0,1\} at this step).*/\1/p' <<<"$where")
        if [ "${times:-1}" -ge 2 ]; then
            echo "$(date +%T) not requeueing job $SLURM_JOB_ID: $where: a hang that repeats at one step is not a" \
                 "one-off; see $run_dir/stall.json and stall-rank*.txt" >&2
            return 1
        fi
        requeue_job "$where (see $run_dir/stall.json), newest complete checkpoint in $run_dir"
        return
    fi
    if [ ! -f "$run_dir/PREEMPTED" ] || ! grep -q "; $attempt\$" "$run_dir/PREEMPTED"; then
        [ "$status" -eq 0 ] || echo "$(date +%T) not requeueing job $SLURM_JOB_ID: the training exited with status $status without" \
             "a checkpoint for preemption from this attempt ($attempt)" >&2
        return 1
    fi
    requeue_job "preempted with a checkpoint in $run_dir"
}

requeue_job() {
    # WHY: requeue this job (it resumes where it stopped), at most MAX_REQUEUES times; say so in the log.
    local why=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
        echo "$(date +%T) not requeueing job $SLURM_JOB_ID: $why, but it was already requeued $restarts times" \
             "(MAX_REQUEUES=$MAX_REQUEUES); resubmit to continue" >&2
        return 1
    fi
    echo "$(date +%T) $why: requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $MAX_REQUEUES)" >&2
    scontrol requeue "$SLURM_JOB_ID" || true  # already requeued by Slurm (scontrol requeue): fine
    return 0
}

main_port() {
    # The rendezvous port, from the job id: 15000-29999, below Linux's ephemeral ports (32768-60999)
    # that outgoing connections take at random.
    echo $((15000 + $1 % 15000))
}

threads_per_process() {
    # The CPUs the job asked for per node (srun steps get them: SRUN_CPUS_PER_TASK), shared by the workers.
    local cpus=${SLURM_CPUS_PER_TASK:-$(nproc)} n
    n=$((cpus / $(procs_per_node)))
    echo $((n > 1 ? n : 1))
}

# Since Slurm 22.05 srun does not inherit --cpus-per-task from the job; without this a step gets one CPU.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

accelerate_launch() {
    # accelerate_launch NUM_MACHINES MACHINE_RANK MAIN_IP PORT -- train/main.py args...
    # (MAIN_IP empty: one machine, no rendezvous)
    local machines=$1 rank=$2 ip=$3 port=$4 nproc
    shift 5
    nproc=$(procs_per_node)
    local args=(-m accelerate.commands.launch -q --num_machines "$machines" --num_processes $((nproc * machines))
                --dynamo_backend no --num_cpu_threads_per_process "$(threads_per_process)")
    if [ -n "$ACCELERATE_CONFIG" ]; then
        args+=(--config_file "$ACCELERATE_CONFIG")
    else
        args+=(--mixed_precision no)
    fi
    if [ $((nproc * machines)) -gt 1 ]; then
        args+=(--multi_gpu)
    fi
    if [ -n "$ip" ]; then
        # Machine rank 0 hosts the rendezvous store, the others only connect: left to guess from hostnames,
        # another node could bind the port first and machine rank 0 would then refuse to start.
        args+=(--machine_rank "$rank" --main_process_ip "$ip" --main_process_port "$port" --rdzv_backend c10d
               --rdzv_conf "is_host=$([ "$rank" = 0 ] && echo true || echo false)")
    fi
    # shellcheck disable=SC2206
    args+=(${ACCELERATE_ARGS:-})
    if [ -n "${ENTRY:-}" ]; then
        # shellcheck disable=SC2206
        args+=(${ENTRY})
    else
        args+=("$PROJECT_DIR/train/main.py")
    fi
    args+=("$@")
    echo "$(date +%T) $(hostname -s): $PYTHON ${args[*]}" >&2
    "$PYTHON" "${args[@]}"
}
