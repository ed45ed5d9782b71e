"""ResNet and its attention twins (CBAM, SE, BAM) with torchvision's exact structure and keys.

A baseline built here loads a torchvision checkpoint with ``strict=True``. The CBAM twins add one
``cbam`` submodule per residual block, applied after the last BN of the residual branch (``bn2`` in
:class:`BasicBlock`, ``bn3`` in :class:`Bottleneck`) and before the addition, as in the paper
(arXiv 1807.06521, Fig. 3) and the official code. The SE twins put an ``se`` module in the same
place (so SE and CBAM differ only in the gate); the BAM twins add ``bam1..bam3`` after ``layer1..3``
(the stage transitions), as the BAM paper and the official code do.

No operation is in place, so a tensor captured by a hook (a CAM target layer, an attention map)
is never overwritten later in the forward.
"""
from __future__ import annotations

from typing import Type

import torch
from torch import nn

from ._registry import register_model
from .bam import BAM, BAMConfig
from .bam import PAPER as BAM_PAPER
from .cbam import CBAM, OFFICIAL, CBAMConfig
from .se import SqueezeExcite

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "STEMS"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def _add_block_attention(block: nn.Module, channels: int, cbam_config: CBAMConfig | None,
                         se_reduction: int | None, se_divisor: int = 1) -> None:
    """Give ``block`` its ``cbam`` and ``se`` submodules (``None`` when absent; at most one is set)."""
    if cbam_config is not None and se_reduction is not None:
        raise ValueError("a block takes one attention module: CBAM or SE, not both")
    block.cbam = CBAM(channels, cbam_config) if cbam_config is not None else None
    block.se = (SqueezeExcite(channels, reduction=se_reduction, divisor=se_divisor)
                if se_reduction is not None else None)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        cbam_config: CBAMConfig | None = None,
        se_reduction: int | None = None,
        se_divisor: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        _add_block_attention(self, planes, cbam_config, se_reduction, se_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        cbam_config: CBAMConfig | None = None,
        se_reduction: int | None = None,
        se_divisor: int = 1,
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)  # stride on the 3x3, as torchvision (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride
        _add_block_attention(self, planes * self.expansion, cbam_config, se_reduction, se_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet (7x7 stem, max-pool, four stages, global average pool, fc).

    ``stem="cifar"`` swaps the stem for the one CIFAR networks use (3x3 conv, stride 1, no
    max-pool), as the official CBAM/BAM code builds for 32-px images; the rest is unchanged.
    """

    def __init__(
        self,
        block: Type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        num_classes: int = 1000,
        cbam_config: CBAMConfig | None = None,
        se_reduction: int | None = None,
        bam_config: BAMConfig | None = None,
        se_divisor: int = 1,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
        self.cbam_config = cbam_config
        self.se_reduction = se_reduction
        self.se_divisor = se_divisor
        self.bam_config = bam_config
        self.stem = stem
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:  # CIFAR (the official CBAM/BAM code's non-ImageNet network): 3x3, stride 1, no max-pool
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        if bam_config is not None:  # at the three stage transitions, as the official code
            self.bam1 = BAM(64 * block.expansion, bam_config)
            self.bam2 = BAM(128 * block.expansion, bam_config)
            self.bam3 = BAM(256 * block.expansion, bam_config)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        attn = {"cbam_config": self.cbam_config, "se_reduction": self.se_reduction, "se_divisor": self.se_divisor}
        layers = [block(self.inplanes, planes, stride, downsample, **attn)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **attn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                # The official CBAM code starts the spatial gate's BN at weight 0, so every
                # spatial gate begins as a uniform 0.5 and the network learns where to look.
                nn.init.constant_(m.weight, 0.0 if name.endswith("spatial.bn") else 1.0)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        if self.bam1 is not None:
            x = self.bam1(x)
        x = self.layer2(x)
        if self.bam2 is not None:
            x = self.bam2(x)
        x = self.layer3(x)
        if self.bam3 is not None:
            x = self.bam3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def _create_resnet(block, layers: list[int], *, cbam: bool = False, se: bool = False, bam: bool = False,
                   cbam_config: CBAMConfig | None = None, se_reduction: int | None = None,
                   bam_config: BAMConfig | None = None, **kwargs) -> ResNet:
    """Build a ResNet with the attention its builder names; options of another attention raise."""
    for flag, option, value, variant in (
        (cbam, "cbam_config", cbam_config, "*_cbam"),
        (se, "se_reduction", se_reduction, "*_se"),
        (bam, "bam_config", bam_config, "*_bam"),
    ):
        if not flag and value is not None:
            raise ValueError(f"{option} given for a model without that attention (a baseline, or another "
                             f"attention); use the {variant} variant")
    return ResNet(block, layers, cbam_config=(cbam_config or OFFICIAL) if cbam else None,
                  se_reduction=(se_reduction or 16) if se else None,
                  bam_config=(bam_config or BAM_PAPER) if bam else None, **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [2, 2, 2, 2], cbam=False, **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [3, 4, 6, 3], cbam=False, **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 4, 6, 3], cbam=False, **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 4, 23, 3], cbam=False, **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 8, 36, 3], cbam=False, **kwargs)


@register_model
def resnet18_cbam(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [2, 2, 2, 2], cbam=True, **kwargs)


@register_model
def resnet34_cbam(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [3, 4, 6, 3], cbam=True, **kwargs)


@register_model
def resnet50_cbam(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 4, 6, 3], cbam=True, **kwargs)


@register_model
def resnet101_cbam(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 4, 23, 3], cbam=True, **kwargs)


@register_model
def resnet152_cbam(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 8, 36, 3], cbam=True, **kwargs)


@register_model
def resnet18_se(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [2, 2, 2, 2], se=True, **kwargs)


@register_model
def resnet34_se(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [3, 4, 6, 3], se=True, **kwargs)


@register_model
def resnet50_se(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 4, 6, 3], se=True, **kwargs)


@register_model
def resnet18_bam(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [2, 2, 2, 2], bam=True, **kwargs)


@register_model
def resnet34_bam(**kwargs) -> ResNet:
    return _create_resnet(BasicBlock, [3, 4, 6, 3], bam=True, **kwargs)


@register_model
def resnet50_bam(**kwargs) -> ResNet:
    return _create_resnet(Bottleneck, [3, 4, 6, 3], bam=True, **kwargs)
