"""CBAM gates: the paper's formulas, the reduction ratio, gate order, one call per forward, no in-place."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cbam_viz.models import CBAM, OFFICIAL, SIMPLIFIED, ChannelGate, SpatialGate, create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16, 32, 64])
def test_reduction_ratio_sets_hidden_width(r):
    gate = ChannelGate(64, reduction=r)
    assert gate.mlp[0].out_features == 64 // r
    assert gate.mlp[2].in_features == 64 // r
    assert gate.mlp[2].out_features == 64


@pytest.mark.parametrize("r", [4, 8, 32])
def test_reduction_ratio_reaches_every_block(r):
    model = create_model("resnet18_cbam", num_classes=3, cbam_config=replace(OFFICIAL, reduction=r))
    gates = [m for m in model.modules() if isinstance(m, ChannelGate)]
    assert len(gates) == 8
    for g in gates:
        assert g.mlp[0].out_features == g.channels // r


def test_channels_below_ratio_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        ChannelGate(8, reduction=16)
    msg = str(err.value)
    assert "8 channels" in msg and "16" in msg
    with pytest.raises(ValueError, match="ratio"):
        ChannelGate(8, reduction=0)
    with pytest.raises(ValueError):
        create_model("resnet18_cbam", cbam_config=replace(OFFICIAL, reduction=128))


def test_channel_gate_formula():
    torch.manual_seed(0)
    gate = ChannelGate(32, reduction=4)
    x = _x(3, 32, 5, 6)
    expected = torch.sigmoid(gate.mlp(x.mean((2, 3))) + gate.mlp(x.amax((2, 3))))[:, :, None, None]
    out = gate(x)
    assert out.shape == (3, 32, 1, 1)
    torch.testing.assert_close(out, expected)
    # the batched avg/max trick must not mix samples
    torch.testing.assert_close(gate(x[1:2]), out[1:2])


def _delta_kernel(gate: SpatialGate, channel: int) -> None:
    """Make the 7x7 conv pass input channel ``channel`` through unchanged and ignore the other."""
    with torch.no_grad():
        gate.conv.weight.zero_()
        gate.conv.weight[0, channel, 3, 3] = 1.0


def test_spatial_gate_order_official_max_then_mean():
    gate = SpatialGate(bn=False, max_first=True)
    x = _x(2, 16, 6, 7)
    _delta_kernel(gate, 0)
    torch.testing.assert_close(gate(x), torch.sigmoid(x.amax(1, keepdim=True)))
    _delta_kernel(gate, 1)
    torch.testing.assert_close(gate(x), torch.sigmoid(x.mean(1, keepdim=True)))


def test_spatial_gate_order_simplified_mean_then_max():
    cbam = CBAM(16, SIMPLIFIED)
    gate = cbam.spatial
    assert isinstance(gate.bn, torch.nn.Identity)
    x = _x(2, 16, 6, 7)
    _delta_kernel(gate, 0)
    torch.testing.assert_close(gate(x), torch.sigmoid(x.mean(1, keepdim=True)))
    _delta_kernel(gate, 1)
    torch.testing.assert_close(gate(x), torch.sigmoid(x.amax(1, keepdim=True)))


def test_spatial_gate_with_bn_formula():
    gate = SpatialGate().eval()
    with torch.no_grad():
        gate.bn.weight.fill_(1.5)
        gate.bn.bias.fill_(0.2)
        gate.bn.running_mean.fill_(0.1)
        gate.bn.running_var.fill_(2.0)
    x = _x(2, 8, 9, 9)
    pooled = torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), 1)
    z = F.conv2d(pooled, gate.conv.weight, padding=3)
    expected = torch.sigmoid((z - 0.1) / torch.sqrt(torch.tensor(2.0 + 1e-5)) * 1.5 + 0.2)
    out = gate(x)
    assert out.shape == (2, 1, 9, 9)
    torch.testing.assert_close(out, expected)


def test_cbam_applies_channel_then_spatial():
    torch.manual_seed(0)
    cbam = CBAM(32, replace(OFFICIAL, reduction=8)).eval()
    with torch.no_grad():
        cbam.spatial.bn.weight.fill_(1.0)
    x = _x(2, 32, 5, 5)
    x1 = x * cbam.channel(x)
    torch.testing.assert_close(cbam(x), x1 * cbam.spatial(x1))


def test_simplified_config_has_no_bias_and_no_bn():
    cbam = CBAM(32, SIMPLIFIED)
    names = dict(cbam.named_parameters())
    assert set(names) == {"channel.mlp.0.weight", "channel.mlp.2.weight", "spatial.conv.weight"}
    assert not list(cbam.buffers())


@pytest.mark.parametrize("name", ["resnet18_cbam", "resnet50_cbam"])
def test_each_gate_runs_once_per_forward(name):
    model = create_model(name, num_classes=3).eval()
    calls: dict[str, int] = {}
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, (ChannelGate, SpatialGate)):
            calls[n] = 0
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls[n] + 1)))
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    finally:
        for h in handles:
            h.remove()
    n_blocks = sum(1 for n, _ in model.named_modules() if n.endswith(".cbam"))
    assert len(calls) == 2 * n_blocks
    assert all(v == 1 for v in calls.values()), {k: v for k, v in calls.items() if v != 1}
    assert not any(m._forward_hooks for m in model.modules())


def test_gate_outputs_are_attention_maps():
    model = create_model("resnet18_cbam", num_classes=3).eval()
    maps = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: maps.__setitem__(n, o))
             for n, m in model.named_modules() if n in ("layer3.1.cbam.channel", "layer3.1.cbam.spatial")]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert maps["layer3.1.cbam.channel"].shape == (2, 256, 1, 1)
    assert maps["layer3.1.cbam.spatial"].shape == (2, 1, 4, 4)
    for v in maps.values():
        assert (v >= 0).all() and (v <= 1).all()


@pytest.mark.parametrize("name", ["resnet18_cbam", "resnet50_cbam", "resnet18"])
@pytest.mark.parametrize("grad", [False, True])
def test_no_in_place_op_overwrites_a_captured_activation(name, grad):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    model.train(grad)
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(mod, inputs, output, name=""):
        if isinstance(output, torch.Tensor):
            captured.append((name, output, output.detach().clone()))

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
               for n, m in model.named_modules() if n]
    try:
        with torch.set_grad_enabled(grad):
            out = model(torch.randn(2, 3, 64, 64))
            if grad:
                out.sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert len(captured) > 50
    changed = [n for n, live, snap in captured if not torch.equal(live.detach(), snap)]
    assert not changed, f"overwritten after capture: {changed[:5]}"
