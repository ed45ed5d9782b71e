"""An exponential moving average of a model's weights, kept beside the training run.

Averaging the last few thousand steps' weights smooths the noise of small-batch SGD; whether it
helps a given schedule is decided on the held-out split (:mod:`cbam_viz.training.holdout`), not
assumed. The average is part of every checkpoint, so a resumed run averages exactly as an
uninterrupted one.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """Exponential moving average of a model's floating-point state: weights and BN statistics.

    The average is updated in place with one fused ``lerp`` per step (a few ms for a ResNet-18 on
    a CPU), with the usual warm-up ``decay_t = min(decay, (1 + t) / (10 + t))`` so the first steps
    are not averaged with the random initialisation. Integer buffers (BN's batch counters) are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        live = model.state_dict()
        self._float = [(self.state[k], v) for k, v in live.items() if v.dtype.is_floating_point]
        self._other = [(self.state[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    def load(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Take a checkpoint's average (a resumed run) and follow ``model`` again."""
        for k, v in state.items():
            self.state[k].copy_(v)
        self._bind(model)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the live weights after optimisation step ``step`` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        ema, live = zip(*self._float)
        torch._foreach_lerp_(list(ema), list(live), 1.0 - decay)
        for dst, src in self._other:
            dst.copy_(src)

    def model_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averaged state (in eval mode)."""
        twin = copy.deepcopy(model)
        twin.load_state_dict(self.state)
        return twin.eval()
