"""Optimizer choices that are decided without a GPU."""

import pytest
import torch

from train.config import Config
from train.optim import build_optimizer, use_fused


@pytest.mark.parametrize("device, precision, fused", [
    ("cuda", "no", True), ("cuda", "bf16", True),
    ("cuda", "fp16", False),  # GradScaler's in-kernel skip would hide overflow steps from the loop
    ("cpu", "no", False), ("cpu", "bf16", False),
])
def test_fused_kernels_only_where_they_are_correct(device, precision, fused):
    assert use_fused(device, precision) is fused


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cpu_optimizers_are_not_fused(optimizer):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(Config(optimizer=optimizer), model, "bf16")
    assert not opt.defaults.get("fused")
