"""The EMA of the weights (train/ema.py): averaged parameters, copied BatchNorm buffers, and the swap used
for validation and testing."""

import pytest
import torch

from train.ema import EMA

DECAY = 0.9


def small_model() -> torch.nn.Module:
    """Convolution, BatchNorm (running_mean, running_var, num_batches_tracked) and a linear head, in float64
    so that the EMA formula can be compared to 1e-12."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()


def train_step(model: torch.nn.Module, seed: int) -> None:
    """What one optimizer step does to the model: new weights, and new BatchNorm statistics (train-mode forward)."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        model(torch.randn(8, 3, 6, 6, generator=generator, dtype=torch.float64) * 3 + 1)


def snapshot(tensors: dict) -> dict:
    return {k: v.detach().clone() for k, v in tensors.items()}


PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias", "5.weight", "5.bias"]
BUFFERS = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_the_model_has_what_the_tests_need():
    model = small_model()
    assert [n for n, _ in model.named_parameters()] == PARAMS and [n for n, _ in model.named_buffers()] == BUFFERS


def test_update_is_decay_times_old_plus_one_minus_decay_times_new():
    model = small_model()
    ema = EMA(model, DECAY)
    assert all(torch.equal(ema.state[k], v) for k, v in model.state_dict().items())  # starts at the weights
    for seed in (1, 2, 3):
        old = snapshot(ema.state)
        train_step(model, seed)
        ema.update(model)
        new = model.state_dict()
        for name in PARAMS:
            want = DECAY * old[name] + (1 - DECAY) * new[name]
            torch.testing.assert_close(ema.state[name], want, rtol=1e-12, atol=1e-12, msg=name)
            assert not torch.equal(ema.state[name], new[name]), name


def test_update_converges_to_weights_that_stop_changing():
    model = small_model()
    ema = EMA(model, DECAY)
    start = snapshot(ema.state)
    train_step(model, 1)
    target = snapshot(model.state_dict())
    for _ in range(5):
        ema.update(model)
    for name in PARAMS:  # n updates towards fixed weights: target + decay^n (start - target)
        torch.testing.assert_close(ema.state[name], target[name] + DECAY ** 5 * (start[name] - target[name]),
                                   rtol=1e-12, atol=1e-12, msg=name)


def test_batchnorm_buffers_are_copied_not_averaged():
    model = small_model()
    ema = EMA(model, DECAY)
    for seed in (1, 2):
        train_step(model, seed)
        ema.update(model)
        for name in BUFFERS:
            assert torch.equal(ema.state[name], model.state_dict()[name]), name
    assert ema.state["1.num_batches_tracked"].item() == 2
    # Copies, not the model's own tensors: the next training step must not change the EMA.
    kept = snapshot(ema.state)
    train_step(model, 3)
    assert all(torch.equal(ema.state[k], kept[k]) for k in kept)


def test_swapped_in_runs_the_body_with_the_ema_and_restores_the_trained_weights():
    model = small_model()
    ema = EMA(model, DECAY)
    for seed in (1, 2):
        train_step(model, seed)
        ema.update(model)
    train_step(model, 3)  # the trained weights are now ahead of the EMA, buffers included
    trained = snapshot(model.state_dict())
    params = [(p, p.data_ptr()) for p in model.parameters()]  # the optimizer holds these very tensors
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    reference = small_model()
    reference.load_state_dict(ema.state)
    reference.eval()

    with ema.swapped_in(model):
        assert all(torch.equal(v, ema.state[k]) for k, v in model.state_dict().items())
        model.eval()
        assert torch.equal(model(x), reference(x))  # what validation computes is the EMA model's output
    after = model.state_dict()
    assert all(torch.equal(after[k], trained[k]) for k in trained)
    assert all(p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(model.parameters(), params, strict=True))

    with pytest.raises(RuntimeError, match="interrupted"):
        with ema.swapped_in(model):
            raise RuntimeError("interrupted")
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


def test_swapped_in_leaves_the_ema_unchanged():
    model = small_model()
    ema = EMA(model, DECAY)
    train_step(model, 1)
    ema.update(model)
    kept = snapshot(ema.state)
    with ema.swapped_in(model):
        train_step(model, 2)  # even a body that changes the model in place
    assert all(torch.equal(ema.state[k], kept[k]) for k in kept)


def test_cpu_state_and_load_round_trip():
    """What a checkpoint keeps (ema.safetensors) and a resumed run loads back."""
    model = small_model()
    ema = EMA(model, DECAY)
    train_step(model, 1)
    ema.update(model)
    saved = ema.cpu_state()
    other = EMA(small_model(), DECAY)
    other.load(saved)
    assert all(torch.equal(other.state[k], ema.state[k]) for k in ema.state)
