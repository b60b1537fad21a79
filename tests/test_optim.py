"""Optimizer, weight decay and learning-rate schedules (train/optim.py)."""

import math

import pytest
import torch

from train.config import Config
from train.optim import build_optimizer, build_scheduler, lr_factor, use_fused


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


# ---- Weight decay: on weights, never on norms and biases ------------------------------------------------------

NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def decay_expected(model: torch.nn.Module) -> dict:
    """{parameter name: should it decay}, from what each parameter is (not from its shape)."""
    expected = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            expected[full] = name == "weight" and not isinstance(module, NORMS)
    return expected


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])  # BatchNorm; SE blocks' biased convs
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_weight_decay_on_norms_and_biases(arch, optimizer):
    import torchvision

    model = torchvision.models.get_model(arch, num_classes=4)
    expected = decay_expected(model)
    assert any(expected.values()) and not all(expected.values())
    opt = build_optimizer(Config(optimizer=optimizer, weight_decay=5e-4), model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in got, f"{names[id(p)]} is in two groups"
            got[names[id(p)]] = group["weight_decay"]
    assert got.keys() == expected.keys()  # every parameter is trained
    wrong = {n: wd for n, wd in got.items() if wd != (5e-4 if expected[n] else 0.0)}
    assert not wrong, wrong


def test_weight_decay_acts_on_weights_only():
    """With zero gradients, one SGD step only shrinks the decayed weights: p <- p - lr * wd * p."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(Config(optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.1), model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        decays = name in ("0.weight", "3.weight")
        torch.testing.assert_close(p.detach(), before[name] * (1 - 0.05) if decays else before[name], msg=name)


# ---- Learning-rate schedules, in optimizer steps ----------------------------------------------------------------

SPE, EPOCHS = 8, 10  # 8 optimizer steps an epoch, 80 in all
TOTAL = SPE * EPOCHS


def cosine(t: float) -> float:
    """Half a cosine from 1 (t = 0) to 0 (t = 1)."""
    return (1 + math.cos(math.pi * t)) / 2


def expected_factor(scheduler, step, warmup_steps=0, step_size=0, gamma=0.1, end=0.0):
    """The multiplier of the peak lr for the step after `step` optimizer steps, from the README's description:
    a linear warmup reaching the peak on its last step, then the schedule over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    after = step - warmup_steps
    if scheduler == "none":
        return 1.0
    if scheduler == "step":
        return gamma ** (after // step_size)
    return end + (1 - end) * cosine(min(1.0, after / (TOTAL - warmup_steps)))


CASES = {  # name: (Config options, expected_factor options, steps to check)
    "none": ({}, {}, [0, 40, 79, 80]),
    "none+warmup": ({"warmup_epochs": 2}, {"warmup_steps": 16}, [0, 7, 15, 16, 50, 80]),
    "cosine": ({}, {}, [0, 20, 40, 60, 79, 80, 90]),
    "cosine+warmup": ({"warmup_epochs": 2}, {"warmup_steps": 16}, [0, 7, 15, 16, 32, 48, 64, 80]),
    "cosine+half-epoch-warmup": ({"warmup_epochs": 0.5}, {"warmup_steps": 4}, [0, 1, 3, 4, 42, 80]),
    "step": ({}, {"step_size": 24}, [0, 23, 24, 47, 48, 71, 72, 79]),  # every epochs // 3 = 3 epochs
    "step-4-epochs": ({"lr_step_size": 4, "lr_gamma": 0.5}, {"step_size": 32, "gamma": 0.5}, [0, 31, 32, 63, 64, 79]),
    "step+warmup": ({"warmup_epochs": 1, "lr_step_size": 2}, {"warmup_steps": 8, "step_size": 16},
                    [0, 7, 8, 23, 24, 40, 79]),
    # OneCycle: warm up over the first 30 % of the steps, then anneal to 1/1000 of the peak.
    "onecycle": ({}, {"warmup_steps": 24, "end": 1e-3}, [0, 11, 23, 24, 52, 66, 79, 80]),
    "onecycle+warmup": ({"warmup_epochs": 1}, {"warmup_steps": 8, "end": 1e-3}, [0, 7, 8, 44, 80]),
}


@pytest.mark.parametrize("case", CASES)
def test_schedule_shape(case):
    options, shape, steps = CASES[case]
    scheduler = case.split("+")[0].split("-")[0]
    cfg = Config(scheduler=scheduler, epochs=EPOCHS, **options)
    for step in steps:
        want = expected_factor(scheduler, step, **shape)
        assert lr_factor(cfg, step, SPE) == pytest.approx(want, rel=1e-12, abs=1e-12), f"step {step}"


def test_cosine_points_by_hand():
    """The same, with the numbers written out: start, a quarter, the middle, three quarters, the end."""
    cfg = Config(scheduler="cosine", epochs=EPOCHS)
    got = [lr_factor(cfg, s, SPE) for s in (0, 20, 40, 60, 80)]
    assert got == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0], abs=1e-7)
    warm = Config(scheduler="cosine", epochs=EPOCHS, warmup_epochs=1)
    assert [lr_factor(warm, s, SPE) for s in (0, 3, 7, 8, 44, 80)] == \
        pytest.approx([0.125, 0.5, 1.0, 1.0, 0.5, 0.0], abs=1e-7)


def test_scheduler_drives_the_optimizer_lr():
    """build_scheduler's LambdaLR: the lr of optimizer step k (counting from 1) is peak * factor(k - 1)."""
    cfg = Config(scheduler="cosine", epochs=EPOCHS, warmup_epochs=1, lr=0.4)
    opt = build_optimizer(cfg, torch.nn.Linear(3, 2))
    sched = build_scheduler(cfg, opt, SPE)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(group["lr"] == pytest.approx(0.0, abs=1e-12) for group in opt.param_groups)  # ends with training
    assert lrs[0] == pytest.approx(0.4 / 8) and lrs[7] == pytest.approx(0.4) and lrs[8] == pytest.approx(0.4)
    assert lrs == pytest.approx([0.4 * expected_factor("cosine", s, warmup_steps=8) for s in range(TOTAL)])
    assert all(a >= b for a, b in zip(lrs[7:], lrs[8:]))


@pytest.mark.slow
def test_schedule_counts_optimizer_steps_under_gradient_accumulation(dataset_dir, tmp_path):
    """5 batches an epoch, 2 per optimizer step: 3 optimizer steps an epoch (the last one takes 1 batch), so a
    2-epoch cosine schedule trains epoch 1 at its positions 0, 1, 2 of 6 and epoch 2 at 3, 4, 5 (metrics.jsonl's
    lr: the mean rate of the epoch's steps). Counted in batches (10 steps) it would still be at 0.79 and 0.35 after
    the epochs; counted in whole accumulations (2 an epoch) it would end at step 4."""
    from conftest import check, read_metrics, run_main

    out = tmp_path / "run"
    check(run_main(["--dataset", str(dataset_dir), "--output-dir", str(out), "--arch", "resnet18",
                    "--batch-size", "16", "--eval-batch-size", "64", "--limit-batches", "5", "--epochs", "2",
                    "--grad-accum-steps", "2", "--lr", "0.02", "--scheduler", "cosine", "--wandb-mode", "disabled"]))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [3, 6]
    means = [0.02 * sum(cosine(k / 6) for k in steps) / 3 for steps in (range(0, 3), range(3, 6))]
    assert [r["lr"] for r in records] == pytest.approx(means, abs=1e-12)
