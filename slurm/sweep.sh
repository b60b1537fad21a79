#!/bin/bash
# A search sweep as a Slurm job array: every array task is a worker of one study (python -m train.sweep),
# which asks it for a trial, trains it, tells it how it went and asks again, until the sweep file's run_cap
# trials are done, its grid is exhausted or the task has run its --run-cap N trials (wandb agent --count N).
# So the array's size is the number of workers, not of trials. A random or bayes sweep with neither cap runs
# until cancelled: the time limit requeues a task as preemption does (up to MAX_REQUEUES times).
# Submit from the project folder; a sweep file first (default: configs/sweep-arch-lr.yaml, a grid of 9), then
# train.sweep's options, then the options of every trial's train/main.py:
#   mkdir -p logs && sbatch slurm/sweep.sh --epochs 30
#   sbatch --array=0-7%4 slurm/sweep.sh configs/sweep-mobilenet_v2.yaml --epochs 30   # 8 workers, 4 at a time
#   sbatch slurm/sweep.sh configs/sweep-mobilenet_v2.yaml --workers-per-gpu 2 --epochs 30   # 2 trials per GPU
#   sbatch --array=0-3 slurm/sweep.sh configs/sweep-mobilenet_v2.yaml --run-cap 8 --epochs 30  # 8 trials per task
# Watch it: optuna-dashboard runs/sweep-<array job id>/study.journal. Then:
#   python -m train.sweep_summary runs/sweep-<array job id>
# Another array can join a running sweep: sbatch slurm/sweep.sh FILE --sweep-dir runs/sweep-<id> ...
#SBATCH --array=0-3%4
#
# ---- Settings to edit for your cluster ---------------------------------------------------------
#SBATCH --job-name=cifar-sweep
#SBATCH --partition=gpu              # your GPU partition
##SBATCH --account=my-account        # your account (remove one '#' to use)
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1            # GPUs per worker (--processes-per-trial N: DDP over N of them)
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=02:00:00
# ---- Preemption and logs (keep) ----------------------------------------------------------------
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

# ---- Environment: activate the Python environment that has this project installed ---------------
# module load cuda/12.4
# source ~/venvs/cifar/bin/activate
[ -n "${VENV:-}" ] && source "$VENV/bin/activate"
# ------------------------------------------------------------------------------------------------

source "${PROJECT_DIR:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

: "${SLURM_ARRAY_JOB_ID:?"sweep.sh is a job array: submit it with sbatch (its --array directive)"}"
sweep_file=$PROJECT_DIR/configs/sweep-arch-lr.yaml
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    sweep_file=$1
    shift
fi
# Trials go through accelerate launch with this project's config (bf16), as train.sbatch's runs do.
if [ -n "$ACCELERATE_CONFIG" ]; then
    launch="--config_file $(printf %q "$ACCELERATE_CONFIG")"
else
    launch="--mixed_precision no"
fi
export CIFAR_SWEEP_LAUNCH="${CIFAR_SWEEP_LAUNCH:---dynamo_backend no $launch ${ACCELERATE_ARGS:-}}"
sweep_dir=$RUNS_DIR/sweep-$SLURM_ARRAY_JOB_ID  # --sweep-dir among the options overrides it
echo "array task $SLURM_ARRAY_TASK_ID: a worker of $sweep_file in $sweep_dir (restart ${SLURM_RESTART_COUNT:-0})"

status=0
run_node "$PYTHON" -m train.sweep "$sweep_file" --sweep-dir "$sweep_dir" "$@" || status=$?
# 75: a trial of this worker stopped at a checkpoint (preempted, or the time limit's USR1) and stays RUNNING;
# the requeued task resumes it (same trial, same folder), then asks for more.
if [ "$status" -eq 75 ] && requeue_job "a trial stopped with a checkpoint"; then
    exit 0
fi
exit "$status"
