"""The loop's public interface: it syncs the processes once per sync step (log, checkpoint, stop, epoch end) and
gives hooks plain values; typed totals and stop reasons."""

import dataclasses

import pytest

from train.loop import Hooks, LoopConfig, Stop, Totals, TrainState, fit, train_one_epoch

BATCH = 16  # parts_for's batch size


class Recorder(Hooks):
    def __init__(self, stop_from_step=None):
        self.calls, self.stop_from_step, self.step = [], stop_from_step, 0

    def on_step(self, state):
        self.calls.append(("step", state.step))
        self.step = state.step

    def on_log(self, state, values):
        self.calls.append(("log", state.step, values))

    def on_checkpoint(self, state):
        self.calls.append(("checkpoint", state.step, list(state.partial), state.partial_seconds))

    def on_epoch_end(self, state, record, improved):
        self.calls.append(("epoch_end", state.step, record["train_images"]))

    def stop_requested(self):
        return self.stop_from_step is not None and self.step >= self.stop_from_step

    def of(self, kind):
        return [call[1:] for call in self.calls if call[0] == kind]


@pytest.fixture
def collectives(parts_for, monkeypatch):
    """build(**options) -> (Config, Parts, {collective: calls}), counting the Accelerator's collectives."""
    def build(**options):
        cfg, parts = parts_for(**options)
        counts = {"gather": 0, "reduce": 0, "wait_for_everyone": 0, "gather_for_metrics": 0}
        for name in counts:
            def counted(*args, _original=getattr(parts.accelerator, name), _name=name, **kwargs):
                counts[_name] += 1
                return _original(*args, **kwargs)
            monkeypatch.setattr(parts.accelerator, name, counted)
        return cfg, parts, counts
    return build


def test_hooks_get_plain_values_at_the_steps_the_loop_syncs(collectives):
    _, parts, counts = collectives()
    hooks = Recorder()
    epoch = train_one_epoch(parts, LoopConfig(log_every=3, checkpoint_every=4, max_steps=8), TrainState(), hooks)
    assert [step for (step,) in hooks.of("step")] == list(range(1, 9))
    assert [step for step, _ in hooks.of("log")] == [3, 6]
    for step, values in hooks.of("log"):
        assert set(values) == {"train/loss", "train/lr", "train/images_per_second"}
        assert all(type(v) is float for v in values.values()) and values["train/loss"] > 0
    (step_a, at_4, seconds_4), (step_b, at_8, seconds_8) = hooks.of("checkpoint")
    assert (step_a, step_b) == (4, 8)
    assert [t.seen for t in at_4] == [4 * BATCH] and [t.seen for t in at_8] == [8 * BATCH] and 0 < seconds_4 < seconds_8
    # One gather at each sync step (3, 4, 6, 8) and one at the end of the epoch; nothing else communicates.
    assert counts == {"gather": 5, "reduce": 0, "wait_for_everyone": 0, "gather_for_metrics": 0}
    assert epoch.stop is Stop.MAX_STEPS and isinstance(epoch.totals, Totals) and epoch.totals.seen == 8 * BATCH
    assert 0 <= epoch.totals.correct <= epoch.totals.seen and epoch.totals.loss == epoch.totals.loss_sum / (8 * BATCH)


def test_without_log_or_checkpoint_steps_an_epoch_syncs_once(collectives):
    _, parts, counts = collectives()
    epoch = train_one_epoch(parts, LoopConfig(log_every=1000, max_steps=6), TrainState(), Recorder())
    assert counts["gather"] == 1 and epoch.totals.seen == 6 * BATCH


def test_a_single_process_stops_at_the_step_it_is_asked(collectives):
    _, parts, counts = collectives()
    state, hooks = TrainState(), Recorder(stop_from_step=5)
    epoch = train_one_epoch(parts, LoopConfig(log_every=1000), state, hooks)
    assert epoch.stop is Stop.SIGNAL and state.step == 5 and state.batch_in_epoch == 5
    assert [t.seen for t in state.partial] == [5 * BATCH]  # what the preemption checkpoint records
    assert counts["gather"] == 2  # the stop step's sync, and the epoch's end


def test_fit_runs_every_epoch_and_says_why_it_stopped(parts_for, capsys):
    _, parts = parts_for(limit_batches=0)
    hooks = Recorder()
    state = TrainState()
    assert fit(parts, LoopConfig(epochs=2, log_every=1000), state, hooks) is Stop.FINISHED
    ends = hooks.of("epoch_end")
    assert len(ends) == 2 == state.epoch and ends[1][0] == state.step == 2 * ends[0][0]
    assert ends[0][1] == len(parts.train_loader.dataset)  # every training image once an epoch
    assert capsys.readouterr().out == ""  # the epoch line is RunHooks' to print, not the loop's
    assert fit(parts, LoopConfig(epochs=2), state, hooks) is Stop.FINISHED and state.epoch == 2  # nothing left

    fresh = TrainState()
    assert fit(parts, LoopConfig(epochs=5, max_steps=3), fresh, Recorder()) is Stop.MAX_STEPS and fresh.step == 3
    asked = Recorder(stop_from_step=0)
    assert fit(parts, LoopConfig(epochs=2), TrainState(), asked) is Stop.SIGNAL and asked.of("step") == []


@pytest.mark.parametrize("saved", [[[2.5, 3.0, 4.0]], [{"loss_sum": 2.5, "correct": 3.0, "seen": 4.0}]])
def test_running_totals_read_every_checkpoint_format(saved):
    """Older checkpoints stored [loss sum, correct, seen]; newer ones the Totals fields."""
    state = TrainState(partial=saved)
    assert state.partial == [Totals(2.5, 3.0, 4.0)]
    assert TrainState(**dataclasses.asdict(state)).partial == state.partial  # what a checkpoint round trip does
    assert sum(state.partial * 2, Totals()) == Totals(5.0, 6.0, 8.0) and state.partial[0].accuracy == 0.75


def test_compiled_training_has_one_static_graph_per_batch_size(parts_for, monkeypatch):
    """230 training images in batches of 16 leave a short last batch of 6. It gets a static graph of its own,
    and later full batches go on using theirs; dynamo's default would recompile at the 6 with a symbolic batch
    size and run every later batch, and evaluation, through that dynamic-shape graph."""
    import torch

    graphs = []  # (batch size, whether any input is symbolic) per graph dynamo compiled

    def backend(gm, example_inputs):  # dynamo's decisions are the same for any backend; this one runs eagerly
        images = next(x for x in example_inputs if isinstance(x, torch.Tensor) and x.shape[1:] == (3, 32, 32))
        graphs.append((images.shape[0], any(isinstance(x, torch.SymInt) for x in example_inputs)))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **options: compile_(model, backend=backend,
                                                                                        **options))
    torch._dynamo.reset()
    try:
        _, parts = parts_for(compile=True)
        assert fit(parts, LoopConfig(epochs=2, log_every=1000), TrainState(), Hooks()) is Stop.FINISHED
    finally:
        torch._dynamo.reset()
    assert graphs == [(16, False), (6, False), (26, False)]  # train, the short last batch, validation (eval mode)


@pytest.mark.parametrize("options", [{"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}], ids=["mixup", "cutmix"])
def test_a_runs_mixup_and_cutmix_reach_the_training_loss(parts_for, monkeypatch, options):
    """The parts a run builds from its options train on soft targets: each row a mix of two classes, where
    without MixUp/CutMix it would be a class index (the augmentation itself: tests/test_augment.py)."""
    import torch.nn.functional as F

    targets, cross_entropy = [], F.cross_entropy

    def spy(logits, target, **kwargs):
        targets.append(target.detach().clone())
        return cross_entropy(logits, target, **kwargs)
    monkeypatch.setattr(F, "cross_entropy", spy)
    _, parts = parts_for(**options)
    train_one_epoch(parts, LoopConfig(max_steps=2), TrainState(), Hooks())
    assert len(targets) == 2 and all(t.shape == (BATCH, 4) and t.dtype.is_floating_point for t in targets)
    assert all(((t > 0) & (t < 1)).any() for t in targets), targets  # mixed rows, not one-hot ones
    _, plain = parts_for()
    targets.clear()
    train_one_epoch(plain, LoopConfig(max_steps=1), TrainState(), Hooks())
    assert targets[0].shape == (BATCH,)  # the spy sees what the loss gets
