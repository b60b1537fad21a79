"""No host synchronisation inside a training step except every --log-every steps.

On a GPU every read of a device value by the host (.item(), .tolist(), .cpu(), bool(tensor), ...) and every
torch.tensor(..., device=...) waits for the device. Here, on CPU, the same calls are counted: the number per
epoch must not grow with the number of steps.
"""

import collections

import pytest
import torch

from train.loop import Hooks, LoopConfig, TrainState, train_one_epoch

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


@pytest.fixture
def host_reads(monkeypatch):
    counts = collections.Counter()
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    make = torch.tensor

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None:
            counts["torch.tensor(device=...)"] += 1
        return make(*args, **kwargs)
    monkeypatch.setattr(torch, "tensor", tensor)
    return counts


def reads_per_epoch(parts_for, host_reads, **options) -> int:
    cfg, parts = parts_for(**options)
    host_reads.clear()
    train_one_epoch(parts, LoopConfig.from_config(cfg), TrainState(), Hooks())
    return sum(host_reads.values())


@pytest.mark.parametrize("extra", [{}, {"clip_grad_norm": 1.0, "grad_accum_steps": 2},
                                   {"auto_augment": "autoaugment", "random_erasing": 0.5},
                                   {"auto_augment": "randaugment", "random_erasing": 0.5}])
def test_host_reads_do_not_grow_with_the_steps(parts_for, host_reads, extra):
    few = reads_per_epoch(parts_for, host_reads, max_steps=2, log_every=1000, **extra)
    many = reads_per_epoch(parts_for, host_reads, max_steps=6, log_every=1000, **extra)
    assert many == few, host_reads  # only the epoch's start and end read anything
    logged = reads_per_epoch(parts_for, host_reads, max_steps=6, log_every=2, **extra)
    assert logged > many  # the counting works: each log step reads the running loss
