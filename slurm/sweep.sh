#!/bin/bash
# A sweep as a Slurm job array: every combination of the grid below is one array task, one GPU node.
# Submit from the project folder (arguments after the script go to every run's train/main.py):
#   mkdir -p logs && sbatch slurm/sweep.sh --epochs 30
# Then: python -m train.sweep_summary runs/sweep-<array job id>
#
# The grid is right below the #SBATCH lines (sbatch reads those only up to the first command).
# Keep --array at 0-(number of combinations - 1); %4 runs at most 4 tasks at once.
#SBATCH --array=0-8%4
#
# ---- Settings to edit for your cluster ---------------------------------------------------------
#SBATCH --job-name=cifar-sweep
#SBATCH --partition=gpu              # your GPU partition
##SBATCH --account=my-account        # your account (remove one '#' to use)
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1            # GPUs per run
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=02:00:00
# ---- Preemption and logs (keep) ----------------------------------------------------------------
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

# ---- The grid: 3 architectures x 3 learning rates x 1 batch size = 9 runs (--array=0-8) ---------
ARCHS=(mobilenet_v2 mobilenet_v3_large resnet18)
LRS=(0.1 0.05 0.02)
BATCH_SIZES=(128)
# ------------------------------------------------------------------------------------------------
set -euo pipefail

# ---- Environment: activate the Python environment that has this project installed ---------------
# module load cuda/12.4
# source ~/venvs/cifar/bin/activate
[ -n "${VENV:-}" ] && source "$VENV/bin/activate"
# ------------------------------------------------------------------------------------------------

# SWEEP_GRID=file.sh replaces the grid above (the tests use a small one).
[ -n "${SWEEP_GRID:-}" ] && source "$SWEEP_GRID"
source "${PROJECT_DIR:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

n_lr=${#LRS[@]} n_bs=${#BATCH_SIZES[@]}
size=$(( ${#ARCHS[@]} * n_lr * n_bs ))
task=${SLURM_ARRAY_TASK_ID:?"sweep.sh is a job array: submit it with sbatch (its --array directive)"}
if [ "$task" -lt 0 ] || [ "$task" -ge "$size" ]; then
    echo "error: array index $task is outside the grid of $size combinations (0-$((size - 1)))" >&2
    exit 2
fi
if [ "${SLURM_ARRAY_TASK_MIN:-0}" -ne 0 ] || [ "${SLURM_ARRAY_TASK_MAX:-}" -ne $((size - 1)) ]; then
    echo "error: --array=${SLURM_ARRAY_TASK_MIN}-${SLURM_ARRAY_TASK_MAX} does not match the grid of $size" \
         "combinations: submit with --array=0-$((size - 1))" >&2
    exit 2
fi
arch=${ARCHS[$(( task / (n_lr * n_bs) ))]}
lr=${LRS[$(( task / n_bs % n_lr ))]}
bs=${BATCH_SIZES[$(( task % n_bs ))]}
RUN_DIR=$RUNS_DIR/sweep-${SLURM_ARRAY_JOB_ID}/${arch}-lr${lr}-bs${bs}
echo "task $task of $size: arch=$arch lr=$lr batch_size=$bs -> $RUN_DIR (restart ${SLURM_RESTART_COUNT:-0})"

clear_stale_marker "$RUN_DIR"
status=0
run_node accelerate_launch 1 0 "" 0 -- "$@" --arch "$arch" --lr "$lr" --batch-size "$bs" \
    --output-dir "$RUN_DIR" --resume auto --wandb-group "sweep-${SLURM_ARRAY_JOB_ID}" || status=$?
requeue_if_preempted "$RUN_DIR" "$status" && exit 0
[ ! -f "$RUN_DIR/PREEMPTED" ] || exit 75  # preempted, checkpoint written, not requeued: MAX_REQUEUES
exit "$status"
