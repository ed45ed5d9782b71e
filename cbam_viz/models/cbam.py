"""Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv 1807.06521).

Follows the paper and the official code (Jongchan/attention-module ``MODELS/cbam.py``):

* channel gate: one shared MLP (C -> C/r -> C, r honoured) applied to the average- and the
  max-pooled descriptor, the two outputs summed, then a sigmoid;
* spatial gate: channel-wise max and mean stacked (in that order), a 7x7 conv, BatchNorm, sigmoid.

Each gate is a named submodule that *returns its attention map* (``(B, C, 1, 1)`` and
``(B, 1, H, W)``) instead of the gated features, so a forward hook on ``...cbam.channel`` or
``...cbam.spatial`` captures exactly the attention, and the gates are computed once per forward.

The same module can be configured as the simplified variant popularised by the ``resnet_cbam.py``
snippet (no MLP bias, mean-then-max, no BN) so that checkpoints of that kind load; its bugs
(an ignored ``ratio``, gates computed twice) are not reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CBAMConfig", "ChannelGate", "SpatialGate", "CBAM", "OFFICIAL", "SIMPLIFIED"]


@dataclass(frozen=True)
class CBAMConfig:
    """The few switches that separate the official CBAM from the simplified snippet.

    Attributes:
        reduction: reduction ratio r of the channel MLP (paper: 16).
        mlp_bias: whether the MLP's linear layers have a bias (official: yes).
        spatial_bn: whether a BatchNorm follows the 7x7 conv (official: yes).
        max_first: stack channel-max before channel-mean (official order) or after it.
        kernel_size: spatial conv kernel (paper: 7).
    """

    reduction: int = 16
    mlp_bias: bool = True
    spatial_bn: bool = True
    max_first: bool = True
    kernel_size: int = 7


OFFICIAL = CBAMConfig()
SIMPLIFIED = CBAMConfig(mlp_bias=False, spatial_bn=False, max_first=False)


class ChannelGate(nn.Module):
    """Channel attention: ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` of shape ``(B, C, 1, 1)``."""

    def __init__(self, channels: int, *, reduction: int = 16, bias: bool = True) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"CBAM reduction ratio must be >= 1, got {reduction}")
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(
                f"CBAM channel gate: {channels} channels cannot be reduced by a ratio of "
                f"{reduction} (the hidden layer would have 0 units); use a ratio <= {channels}"
            )
        self.channels = channels
        self.reduction = reduction
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        # Both descriptors go through the shared MLP in one batched call.
        pooled = torch.cat((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))), dim=0)
        logits = self.mlp(pooled)
        return torch.sigmoid(logits[:b] + logits[b:]).view(b, c, 1, 1)


class SpatialGate(nn.Module):
    """Spatial attention: ``sigmoid(BN(conv7x7([max_c(x), mean_c(x)])))`` of shape ``(B, 1, H, W)``."""

    def __init__(self, *, kernel_size: int = 7, bn: bool = True, max_first: bool = True) -> None:
        super().__init__()
        self.max_first = max_first
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        # The official code uses momentum 0.01 for this BN; keep it so its statistics match.
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        max_c = x.amax(dim=1, keepdim=True)
        mean_c = x.mean(dim=1, keepdim=True)
        pooled = torch.cat((max_c, mean_c) if self.max_first else (mean_c, max_c), dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
    """Channel gate, then spatial gate, each applied once: ``x * Mc(x)``, then ``x' * Ms(x')``."""

    def __init__(self, channels: int, config: CBAMConfig = OFFICIAL) -> None:
        super().__init__()
        self.config = config
        self.channel = ChannelGate(channels, reduction=config.reduction, bias=config.mlp_bias)
        self.spatial = SpatialGate(
            kernel_size=config.kernel_size, bn=config.spatial_bn, max_first=config.max_first
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)
