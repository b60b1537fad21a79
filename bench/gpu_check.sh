#!/usr/bin/env bash
# The one command for a GPU machine: the GPU tests (tests/test_gpu.py) and the benchmark, from a checkout,
# results in one folder. Budget: under 8 minutes on one H200.
#
#   bench/gpu_check.sh [RESULTS_DIR]        # default: $OUT if set, else results/gpu-check-<time>
#
# Needs PyTorch with CUDA, torchvision, accelerate, pyarrow, pandas, scikit-learn, matplotlib, safetensors,
# pyyaml, tqdm. A node without network and without `datasets` (or wandb) takes their wheels from WHEELS=DIR
# (how to make that folder: docs/benchmarks.md). DATASET=path uses a hub-layout copy of CIFAR-10 for the
# benchmark (real data); without it the benchmark generates 20,000 images.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cifar-site \
        "$WHEELS"/*.whl || { echo "could not install the wheels in $WHEELS" >&2; exit 2; }
    export PYTHONPATH=/tmp/cifar-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the checkout itself, without installing it

{
    date -u +"%Y-%m-%d %H:%M UTC"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$results/machine.txt"

status=0
timeout 250 python3 -m pytest tests/test_gpu.py tests/test_policies.py -m gpu -v -p no:cacheprovider \
    --durations=0 --junitxml="$results/gpu-tests.xml" 2>&1 | tee "$results/gpu-tests.log" || status=1
bench=(--synthetic 20000)
[ -n "${DATASET:-}" ] && bench=(--dataset "$DATASET")
timeout 200 python3 bench/bench.py "${bench[@]}" --repeats 3 --steps 30 --out "$results/bench.md" 2>&1 \
    | tee "$results/bench.log" || status=1
echo "results in $results (tests: $(grep -o 'tests="[0-9]*" ' "$results/gpu-tests.xml" 2>/dev/null)" \
     "failures: $(grep -o 'failures="[0-9]*"' "$results/gpu-tests.xml" 2>/dev/null))"
exit "$status"
