"""Reference networks written for the tests in the key layouts of the codes people train with.

Each stands for one source, with that source's module names (so its ``state_dict`` has that
source's keys) and its own forward, written here from the papers and the codes' structure, not
from our modules: torchvision's ResNet is used as it is; the official CBAM and BAM code
(Jongchan/attention-module ``MODELS/model_resnet.py``, ``cbam.py``, ``bam.py``: ImageNet and CIFAR
networks), timm's SE-ResNet (``se.fc1``/``se.fc2`` with widths rounded to multiples of 8) and the
``resnet_cbam.py`` snippet (``ca``/``sa``) are re-written. A loader that renamed or reshaped one
tensor wrongly gives other logits than these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RefResNet", "randomize", "official_wrapper", "timm_se_hidden"]


def timm_se_hidden(channels: int) -> int:
    """timm's ``make_divisible(channels / 16, 8, round_limit=0)``."""
    return max(8, int(channels / 16 + 4) // 8 * 8)


class _OfficialChannelGate(nn.Module):  # cbam.py: mlp = Flatten, Linear, ReLU, Linear
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))

    def forward(self, x):
        att = self.mlp(F.avg_pool2d(x, x.shape[2:])) + self.mlp(F.max_pool2d(x, x.shape[2:]))
        return x * torch.sigmoid(att)[:, :, None, None]


class _OfficialBasicConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class _OfficialSpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = _OfficialBasicConv()

    def forward(self, x):
        pooled = torch.cat((x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)), 1)
        return x * torch.sigmoid(self.spatial(pooled))


class _OfficialCBAM(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.ChannelGate = _OfficialChannelGate(c, r)
        self.SpatialGate = _OfficialSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class _SnippetCA(nn.Module):  # resnet_cbam.py: 1x1 convs without bias, keys fc.0 / fc.2
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(), nn.Conv2d(c // r, c, 1, bias=False))

    def forward(self, x):
        return torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)) + self.fc(F.adaptive_max_pool2d(x, 1)))


class _SnippetSA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv1(torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True)[0]], 1)))


class _TimmSE(nn.Module):  # timm SEModule: fc1, bn (Identity), act, fc2, gate
    def __init__(self, c: int) -> None:
        super().__init__()
        rd = timm_se_hidden(c)
        self.fc1 = nn.Conv2d(c, rd, 1, bias=True)
        self.fc2 = nn.Conv2d(rd, c, 1, bias=True)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _OfficialBAM(nn.Module):
    """bam.py: ChannelGate.gate_c and SpatialGate.gate_s with the code's own names; product join."""

    def __init__(self, c: int, r: int = 16, dilation: int = 4) -> None:
        super().__init__()
        self.channel_att = nn.Module()
        self.channel_att.gate_c = nn.Sequential()
        self.channel_att.gate_c.add_module("flatten", nn.Flatten())
        self.channel_att.gate_c.add_module("gate_c_fc_0", nn.Linear(c, c // r))
        self.channel_att.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(c // r))
        self.channel_att.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.channel_att.gate_c.add_module("gate_c_fc_final", nn.Linear(c // r, c))
        s = nn.Sequential()
        s.add_module("gate_s_conv_reduce0", nn.Conv2d(c, c // r, 1))
        s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(c // r))
        s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(2):
            s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(c // r, c // r, 3, padding=dilation, dilation=dilation))
            s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(c // r))
            s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        s.add_module("gate_s_conv_final", nn.Conv2d(c // r, 1, 1))
        self.spatial_att = nn.Module()
        self.spatial_att.gate_s = s

    def forward(self, x):
        channel = self.channel_att.gate_c(F.avg_pool2d(x, x.size(2), stride=x.size(2)))[:, :, None, None]
        spatial = self.spatial_att.gate_s(x)
        return (1 + torch.sigmoid(channel.expand_as(x) * spatial.expand_as(x))) * x


class _RefBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, bottleneck: bool, style: str | None, r: int) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        out = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.style = style
        if style == "official":
            self.cbam = _OfficialCBAM(out, r)
        elif style == "snippet":
            self.ca, self.sa = _SnippetCA(out, r), _SnippetSA()
        elif style == "timm_se":
            self.se = _TimmSE(out)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = F.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        else:
            y = self.bn2(self.conv2(y))
        if self.style == "official":
            y = self.cbam(y)
        elif self.style == "snippet":
            y = self.ca(y) * y
            y = self.sa(y) * y
        elif self.style == "timm_se":
            y = self.se(y)
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(y + identity)


class RefResNet(nn.Module):
    """A ResNet in one source's layout.

    Args:
        style: block attention (``"official"`` CBAM, ``"snippet"``, ``"timm_se"``, ``None``), or
            ``"official_bam"`` for BAM after layer1..3.
        stem: ``"imagenet"`` (7x7 s2 + max-pool) or ``"cifar"`` (3x3 s1, no max-pool, 4x4 average
            pool at the end, as the official code's CIFAR network).
    """

    def __init__(self, layers, *, bottleneck: bool, style: str | None, stem: str = "imagenet", r: int = 16,
                 num_classes: int = 7) -> None:
        super().__init__()
        self.stem = stem
        self.conv1 = (nn.Conv2d(3, 64, 7, 2, 3, bias=False) if stem == "imagenet"
                      else nn.Conv2d(3, 64, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        block_style = None if style == "official_bam" else style
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(_RefBlock(inplanes, planes, 2 if (j == 0 and i > 0) else 1, bottleneck, block_style, r))
                inplanes = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            if style == "official_bam" and i < 3:
                setattr(self, f"bam{i + 1}", _OfficialBAM(inplanes, r))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if hasattr(self, f"bam{i}"):
                x = getattr(self, f"bam{i}")(x)
        x = F.avg_pool2d(x, 4) if self.stem == "cifar" else F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and biases, so every renamed tensor changes the output; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(11)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def official_wrapper(model: nn.Module, arch: str) -> dict:
    """What the official trainer saves: a DataParallel state dict inside training state."""
    params = [p for p in model.parameters()]
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros_like(params[0])}},
                 "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "params": list(range(len(params)))}]}
    return {"epoch": 90, "arch": arch, "best_prec1": torch.tensor(77.6), "optimizer": optimizer,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
