"""Mixed precision is what the model's own layers compute in, not just what Accelerate says it set."""

import pytest
import torch
from accelerate.state import AcceleratorState

from train.augment import BatchTransform
from train.config import Config
from train.data import load_image_data
from train.loop import Hooks, LoopConfig, TrainState, evaluate, train_one_epoch
from train.process import make_accelerator
from train.runner import build_parts
from train.models import plain_model


@pytest.fixture
def launched_with(monkeypatch):
    """What `accelerate launch --mixed_precision P` (or the shipped config's bf16) gives the script."""
    def launch(precision):
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
    yield launch
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_training_and_evaluation_run_the_model_in_the_launch_precision(launched_with, dataset_dir, precision, dtype):
    launched_with(precision)
    cfg = Config(dataset=str(dataset_dir), arch="resnet18", batch_size=32, epochs=1, max_steps=1, decode_cache="off",
                 wandb=False)
    accelerator = make_accelerator(cfg, track=False)
    parts = build_parts(cfg, accelerator, load_image_data(cfg))
    seen = []
    classifier = plain_model(accelerator, parts.model).fc  # inside the model, before Accelerate casts outputs back
    classifier.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))

    train_one_epoch(parts, LoopConfig.from_config(cfg), TrainState(), Hooks())
    assert seen == [dtype]
    evaluate(accelerator, parts.model, parts.val_loader, BatchTransform(32))
    assert seen[1:] and set(seen[1:]) == {dtype}
