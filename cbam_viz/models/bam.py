"""Bottleneck Attention Module (Park, Woo et al., BMVC 2018, arXiv 1807.06514).

One BAM sits at each stage transition of a ResNet (after ``layer1``, ``layer2`` and ``layer3``, as
in the official code, Jongchan/attention-module ``MODELS/model_resnet.py``), not in every block as
CBAM does. It computes two branches *in parallel* from the same input:

* channel branch: global average pool, MLP ``C -> C/r -> C`` with a BatchNorm after the hidden
  layer, shape ``(B, C, 1, 1)``;
* spatial branch: 1x1 conv ``C -> C/r``, two 3x3 convs with dilation 4, 1x1 conv to one map (BN +
  ReLU after every conv but the last), shape ``(B, 1, H, W)``;

joins them, ``M = sigmoid(join(Mc, Ms))`` broadcast to ``(B, C, H, W)``, and returns
``x * (1 + M)``.

The join: the paper (Eq. 2) *sums* the branches; the official code *multiplies* them (and its
``ChannelGate`` names an undefined ``gate_activation``, Jongchan/attention-module #27). We follow
the paper by default; ``join="product"`` reproduces the code, for loading its checkpoints.

Each branch and the joint map is a named submodule that *returns* its map (``bam1.channel``,
``bam1.spatial``: the branch logits, before the sigmoid; ``bam1.gate``: the joint map in [0, 1]), so
attention recording captures all three by name, as used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BAMConfig", "BAM", "BAMChannel", "BAMSpatial", "BAMGate", "PAPER", "OFFICIAL_CODE"]


@dataclass(frozen=True)
class BAMConfig:
    """Attributes:
        reduction: reduction ratio r of both branches (paper: 16).
        dilation: dilation of the two 3x3 convs of the spatial branch (paper: 4).
        join: ``"sum"`` (the paper) or ``"product"`` (the official code).
    """

    reduction: int = 16
    dilation: int = 4
    join: str = "sum"

    def __post_init__(self) -> None:
        if self.join not in ("sum", "product"):
            raise ValueError(f"BAM join must be 'sum' (the paper) or 'product' (the official code), got {self.join!r}")
        if self.reduction < 1 or self.dilation < 1:
            raise ValueError(f"BAM reduction and dilation must be >= 1, got {self.reduction}, {self.dilation}")


PAPER = BAMConfig()
OFFICIAL_CODE = BAMConfig(join="product")


def _hidden(channels: int, reduction: int) -> int:
    hidden = channels // reduction
    if hidden < 1:
        raise ValueError(f"BAM: {channels} channels cannot be reduced by a ratio of {reduction}; "
                         f"use a ratio <= {channels}")
    return hidden


class BAMChannel(nn.Module):
    """Channel branch logits ``MLP(avgpool(x))``, shape ``(B, C, 1, 1)``."""

    attention_kind = "channel_logits"

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return self.fc2(self.act(self.bn(self.fc1(x.mean(dim=(2, 3)))))).view(b, c, 1, 1)


class BAMSpatial(nn.Module):
    """Spatial branch logits: 1x1 reduce, two dilated 3x3, 1x1 to one map; shape ``(B, 1, H, W)``."""

    attention_kind = "spatial_logits"

    def __init__(self, channels: int, reduction: int, dilation: int) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.reduce_bn = nn.BatchNorm2d(hidden)
        self.dilated1 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.dilated1_bn = nn.BatchNorm2d(hidden)
        self.dilated2 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.dilated2_bn = nn.BatchNorm2d(hidden)
        self.final = nn.Conv2d(hidden, 1, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.reduce_bn(self.reduce(x)))
        x = self.act(self.dilated1_bn(self.dilated1(x)))
        x = self.act(self.dilated2_bn(self.dilated2(x)))
        return self.final(x)


class BAMGate(nn.Sigmoid):
    """The joint map ``sigmoid(join(Mc, Ms))`` of shape ``(B, C, H, W)``; a class of its own so it is found by type."""

    attention_kind = "joint"


class BAM(nn.Module):
    """``x * (1 + sigmoid(join(channel(x), spatial(x))))``; the branches run in parallel on ``x``."""

    def __init__(self, channels: int, config: BAMConfig = PAPER) -> None:
        super().__init__()
        self.config = config
        self.channel = BAMChannel(channels, config.reduction)
        self.spatial = BAMSpatial(channels, config.reduction, config.dilation)
        self.gate = BAMGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc, ms = self.channel(x), self.spatial(x)
        joined = mc * ms if self.config.join == "product" else mc + ms
        return x + x * self.gate(joined)
