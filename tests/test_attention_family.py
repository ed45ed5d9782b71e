"""SE and BAM gates: the papers' formulas, where they sit, the maps their named submodules return."""
from __future__ import annotations

import pytest
import torch

from cbam_viz.models import create_model
from cbam_viz.models.bam import BAM, BAMConfig
from cbam_viz.models.se import SqueezeExcite, se_hidden

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _keep(seen: dict, name: str, what=lambda args, out: out):
    """A forward hook that stores ``what(args, out)`` once and returns None (so it changes nothing)."""
    def hook(module, args, out):
        seen.setdefault(name, what(args, out))
    return hook


def _randomize_bn(module):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return module.eval()


def test_se_formula_and_reduction():
    torch.manual_seed(0)
    se = SqueezeExcite(64, reduction=8)
    assert se.fc1.out_channels == 8 and se.fc2.in_channels == 8
    x = _x(3, 64, 5, 6)
    z = x.mean((2, 3))  # squeeze: global average pool
    w1, b1 = se.fc1.weight[:, :, 0, 0], se.fc1.bias
    w2, b2 = se.fc2.weight[:, :, 0, 0], se.fc2.bias
    gate = torch.sigmoid(torch.relu(z @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_se_gate_submodule_returns_the_channel_map():
    se = SqueezeExcite(32, reduction=4)
    seen = []
    se.gate.register_forward_hook(lambda m, a, out: seen.append(out) and None)
    x = _x(2, 32, 4, 4)
    y = se(x)
    assert seen[0].shape == (2, 32, 1, 1) and se.gate.attention_kind == "channel"
    torch.testing.assert_close(y, x * seen[0])


@pytest.mark.parametrize("channels,divisor,hidden", [(64, 1, 4), (64, 8, 8), (128, 8, 8), (256, 8, 16), (512, 8, 32)])
def test_se_hidden_width_paper_and_timm(channels, divisor, hidden):
    assert se_hidden(channels, 16, divisor) == hidden


def test_se_sits_where_cbam_sits():
    """On the residual branch after bn2, before the add: the two models differ only in the gate."""
    se_model = create_model("resnet18_se", num_classes=3).eval()
    block = se_model.layer2[0]
    seen = {}
    block.bn2.register_forward_hook(_keep(seen, "bn2"))
    block.se.register_forward_hook(_keep(seen, "se_in", lambda a, out: a[0]))
    block.se.register_forward_hook(_keep(seen, "se_out"))
    block.register_forward_hook(_keep(seen, "block", lambda a, out: (a[0], out)))
    with torch.no_grad():
        se_model(_x(1, 3, 64, 64))
    torch.testing.assert_close(seen["se_in"], seen["bn2"])
    x, out = seen["block"]
    torch.testing.assert_close(out, torch.relu(seen["se_out"] + block.downsample(x)))
    assert sum(isinstance(m, SqueezeExcite) for m in se_model.modules()) == 8


@pytest.mark.parametrize("join", ["sum", "product"])
def test_bam_formula(join):
    torch.manual_seed(1)
    bam = _randomize_bn(BAM(64, BAMConfig(reduction=16, join=join)))
    x = _x(2, 64, 9, 9)
    c, s = bam.channel, bam.spatial
    mc = c.fc2(torch.relu(c.bn(c.fc1(x.mean((2, 3))))))[:, :, None, None]
    h = torch.relu(s.reduce_bn(s.reduce(x)))
    h = torch.relu(s.dilated1_bn(s.dilated1(h)))
    h = torch.relu(s.dilated2_bn(s.dilated2(h)))
    ms = s.final(h)
    joined = mc + ms if join == "sum" else mc * ms
    with torch.no_grad():
        torch.testing.assert_close(bam(x), x * (1 + torch.sigmoid(joined)))
    assert s.dilated1.dilation == (4, 4) and s.dilated1.padding == (4, 4) and s.reduce.out_channels == 4


def test_bam_branches_and_joint_map_are_named_and_returned():
    bam = _randomize_bn(BAM(32, BAMConfig(reduction=8)))
    seen = {}
    for name in ("channel", "spatial", "gate"):
        getattr(bam, name).register_forward_hook(_keep(seen, name))
    x = _x(2, 32, 6, 6)
    with torch.no_grad():
        y = bam(x)
    assert seen["channel"].shape == (2, 32, 1, 1) and seen["spatial"].shape == (2, 1, 6, 6)
    assert seen["gate"].shape == (2, 32, 6, 6)
    torch.testing.assert_close(seen["gate"], torch.sigmoid(seen["channel"] + seen["spatial"]))
    torch.testing.assert_close(y, x * (1 + seen["gate"]))


def test_bam_at_the_three_stage_transitions_only():
    model = create_model("resnet18_bam", num_classes=3).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, BAM)]
    assert names == ["bam1", "bam2", "bam3"]
    assert [model.bam1.channel.fc2.out_features, model.bam2.channel.fc2.out_features,
            model.bam3.channel.fc2.out_features] == [64, 128, 256]
    order = []
    for n in ("layer1", "bam1", "layer2", "bam2", "layer3", "bam3", "layer4"):
        getattr(model, n).register_forward_hook(lambda m, a, out, n=n: order.append(n))
    with torch.no_grad():
        model(_x(1, 3, 64, 64))
    assert order == ["layer1", "bam1", "layer2", "bam2", "layer3", "bam3", "layer4"]


@pytest.mark.parametrize("bad", [dict(join="mean"), dict(reduction=0), dict(dilation=0)])
def test_bam_config_refuses_what_it_cannot_build(bad):
    with pytest.raises(ValueError):
        BAMConfig(**bad)


def test_options_of_another_attention_are_refused():
    with pytest.raises(ValueError, match="se_reduction"):
        create_model("resnet18_cbam", se_reduction=8)
    with pytest.raises(ValueError, match="bam_config"):
        create_model("resnet18_se", bam_config=BAMConfig())


def test_record_attention_captures_se_and_bam_gates_by_name():
    from cbam_viz.engine.attention import attention_gates, record_attention

    se = create_model("resnet18_se", num_classes=3).eval()
    assert [(o, k) for o, k, _ in attention_gates(se)][:2] == [("layer1.0", "channel"), ("layer1.1", "channel")]
    x = _x(2, 3, 64, 64)
    with torch.no_grad(), record_attention(se) as maps:
        se(x)
    assert set(maps) == {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}
    assert set(maps["layer3.1"]) == {"channel"} and maps["layer3.1"]["channel"].shape == (2, 256)
    seen = []
    handle = se.layer3[1].se.gate.register_forward_hook(lambda m, a, out: seen.append(out) and None)
    with torch.no_grad():
        se(x)
    handle.remove()
    torch.testing.assert_close(maps["layer3.1"]["channel"], seen[0].flatten(1))

    bam = _randomize_bn(create_model("resnet18_bam", num_classes=3))
    with torch.no_grad(), record_attention(bam) as maps:
        bam(x)
    assert set(maps) == {"bam1", "bam2", "bam3"}
    m = maps["bam2"]
    assert set(m) == {"channel", "spatial", "channel_branch", "spatial_branch"}
    assert m["channel"].shape == (2, 128) and m["spatial"].shape == (2, 8, 8) and m["spatial_branch"].shape == (2, 8, 8)
    joint = torch.sigmoid(m["channel_branch"][:, :, None, None] + m["spatial_branch"][:, None])
    torch.testing.assert_close(m["spatial"], joint.mean(1))
    torch.testing.assert_close(m["channel"], joint.mean((2, 3)))
    assert not any(mod._forward_hooks for mod in bam.modules())


def test_record_attention_of_cbam_is_unchanged_by_the_family():
    from cbam_viz.engine.attention import attention_gates, cbam_gates

    cbam = create_model("resnet18_cbam", num_classes=3)
    assert attention_gates(cbam) == cbam_gates(cbam)
    assert attention_gates(create_model("resnet18", num_classes=3)) == []
