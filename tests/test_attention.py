import pytest
import torch

from cbam_viz.engine.attention import cbam_gates, record_attention
from conftest import assert_no_hooks, make_model


@pytest.fixture(scope="module")
def cbam_model():
    return make_model("resnet18_cbam")


def test_records_every_gate_with_shapes_and_range(cbam_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), record_attention(cbam_model) as maps:
        cbam_model(x)
    assert list(maps) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    for block, (c, hw) in {"layer1.0": (64, 16), "layer2.1": (128, 8), "layer3.0": (256, 4), "layer4.1": (512, 2)}.items():
        assert maps[block]["channel"].shape == (2, c)
        assert maps[block]["spatial"].shape == (2, hw, hw)
    for m in maps.values():
        for t in m.values():
            assert not t.requires_grad and 0 <= t.min() and t.max() <= 1
    assert_no_hooks(cbam_model)


def test_values_are_the_gate_outputs(cbam_model):
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    gate = cbam_model.layer3[1].cbam.spatial
    handle = gate.register_forward_hook(lambda m, a, out: seen.setdefault("s", out.detach()))
    try:
        with torch.no_grad(), record_attention(cbam_model) as maps:
            cbam_model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(maps["layer3.1"]["spatial"], seen["s"][:, 0])
    assert seen["s"].std() > 0  # non-uniform map: the comparison means something


def test_hooks_removed_after_exception_and_exception_propagates(cbam_model):
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(cbam_model):
            assert len(cbam_model.layer1[0].cbam.channel._forward_hooks) == 1
            raise RuntimeError("boom")
    assert_no_hooks(cbam_model)


def test_baseline_has_no_gates():
    model = make_model("resnet18")
    assert cbam_gates(model) == []
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(1, 3, 32, 32))
    assert maps == {}
    assert_no_hooks(model)
