"""Exponential moving average of the weights, the one validated, tested and saved when enabled.

Every process keeps the same EMA (DDP keeps the weights it averages identical), updated after
each optimizer step; buffers such as BatchNorm statistics are copied, not averaged.
"""

from contextlib import contextmanager

import torch

from train.model_files import cpu_copy


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        averaged = [k for k in self.state if k in self.params]
        torch._foreach_lerp_([self.state[k] for k in averaged], [current[k].detach() for k in averaged],
                             1 - self.decay)
        for k in self.state.keys() - self.params:
            self.state[k].copy_(current[k])

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Run the body with the EMA weights in `model`, then put the trained weights back."""
        trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(trained)

    def sync_buffers(self, accelerator) -> None:
        """Take rank 0's copied buffers on every rank. Under DDP each rank's BatchNorm statistics are its
        own (DDP syncs them only into the model, before a forward); rank 0's are the ones saved, so every
        rank must test with those for the run's test metrics to be the saved model's."""
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            for k in sorted(self.state.keys() - self.params):
                broadcast(self.state[k], from_process=0)

    def cpu_state(self) -> dict:
        return cpu_copy(self.state)

    def load(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
