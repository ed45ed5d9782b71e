"""Squeeze-and-Excitation (Hu et al., CVPR 2018, arXiv 1709.01507): channel attention only.

Squeeze = global average pool; excitation = FC (C -> C/r) - ReLU - FC (C/r -> C) - sigmoid, with
the FCs as 1x1 convolutions and the keys ``fc1`` / ``fc2`` of timm's ``SEModule``, so an
SE-ResNet checkpoint in that (torchvision-style) layout loads as it is. Placed where CBAM sits (on
the residual branch after the last BN, before the add), so SE-ResNet and CBAM-ResNet differ only
in the gate: SE has no max-pooled descriptor and no spatial gate.

The sigmoid is the named submodule ``gate`` (``layer3.1.se.gate``): it *returns* the channel map
``(B, C, 1, 1)``, so a forward hook captures the attention exactly as it was used.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SqueezeExcite", "SEGate", "se_hidden"]


def se_hidden(channels: int, reduction: int, divisor: int = 1) -> int:
    """Width of the excitation's hidden layer: ``channels // reduction`` (the paper), or, with
    ``divisor > 1``, rounded to a multiple of it and at least it, as timm's ``SEModule`` does
    (``make_divisible(C / r, 8)``: 64 channels -> 8, not 4), so timm checkpoints load."""
    if divisor == 1:
        return channels // reduction
    return max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)


class SEGate(nn.Sigmoid):
    """The sigmoid of an SE module, a class of its own so attention recording finds it by type."""

    attention_kind = "channel"


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(avgpool(x)))))``; the reduction ratio ``r`` is honoured."""

    def __init__(self, channels: int, *, reduction: int = 16, divisor: int = 1) -> None:
        super().__init__()
        if reduction < 1 or divisor < 1:
            raise ValueError(f"SE reduction ratio and divisor must be >= 1, got {reduction}, {divisor}")
        hidden = se_hidden(channels, reduction, divisor)
        if hidden < 1:
            raise ValueError(f"SE gate: {channels} channels cannot be reduced by a ratio of {reduction} "
                             f"(the hidden layer would have 0 units); use a ratio <= {channels}")
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = SEGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(squeezed))))
