"""What bench/gpu_check.sh records first: versions and CUDA, then the route every test and benchmark takes
(parquet in hub layout -> `datasets`, fingerprinted -> decode), so a broken environment shows in seconds.

    python bench/env_check.py DATA_FOLDER [DATASET]    # writes 20,000 generated images unless DATASET is given
"""

import platform
import runpy
import sys
import time
from pathlib import Path

import accelerate
import datasets
import torch
import torchvision

from train.config import Config
from train.data import load_image_data

ROOT = Path(__file__).resolve().parent.parent


def main(folder: str, dataset: str = "") -> None:
    print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
          "torchvision", torchvision.__version__, "accelerate", accelerate.__version__, "datasets",
          datasets.__version__)
    print("CUDA:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
    start = time.perf_counter()
    if not dataset:
        write_parquet_dataset = runpy.run_path(str(ROOT / "tests" / "synthetic.py"))["write_parquet_dataset"]
        dataset = str(write_parquet_dataset(folder, n_train=20000, n_test=500))
    data = load_image_data(Config(dataset=dataset))
    print(f"dataset {dataset}: {len(data.train)} train / {len(data.test)} test decoded in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
