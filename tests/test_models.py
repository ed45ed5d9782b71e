"""The model registry and the ResNet / ResNet-CBAM builders (timm ``tests/test_models.py`` style)."""
from __future__ import annotations

import pytest
import torch

from cbam_viz.models import create_model, is_model, list_models, register_model

pytestmark = pytest.mark.usefixtures("one_thread")

BASELINES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_depth_and_its_twin():
    names = list_models()
    assert names == sorted(names)
    for base in BASELINES:
        assert base in names and f"{base}_cbam" in names
        assert is_model(base)
    assert not is_model("resnet9000")


def test_unknown_model_error_lists_known_names():
    with pytest.raises(KeyError) as err:
        create_model("resnet9000")
    msg = str(err.value)
    assert "resnet9000" in msg
    for name in list_models():
        assert name in msg


def test_duplicate_registration_raises():
    def resnet18(**kwargs):  # same name as a registered builder
        raise AssertionError("never built")

    before = list_models()
    with pytest.raises(ValueError, match="resnet18"):
        register_model(resnet18)
    assert list_models() == before


def test_cbam_config_on_baseline_is_rejected():
    from cbam_viz.models import SIMPLIFIED

    with pytest.raises(ValueError, match="baseline"):
        create_model("resnet18", cbam_config=SIMPLIFIED)


def test_resnet50_parameter_counts():
    # torchvision's resnet50 has 25,557,032 parameters; the paper reports 28.09 M for ResNet50+CBAM.
    with torch.device("meta"):
        assert _num_params(create_model("resnet50")) == 25_557_032
        assert _num_params(create_model("resnet50_cbam")) == 28_089_624


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_state_dict_matches_torchvision(name):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = create_model(name).state_dict()
        theirs = getattr(tv.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_load_strict_and_outputs_match(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = getattr(tv.models, name)(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    ours = create_model(name, num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_no_nan_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad
    # The spatial gates' BN starts at weight 0 (official init), which blocks the gradient of the
    # 7x7 conv before it for the first step; everything else must move.
    dead = [n for n, p in model.named_parameters()
            if p.grad.abs().sum() == 0 and not n.endswith("spatial.conv.weight")]
    assert not dead, f"zero gradient for {dead[:5]}"
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 5)


def test_spatial_gate_starts_uniform_but_conv_learns_once_bn_moves():
    model = create_model("resnet18_cbam", num_classes=3)
    bns = [m for n, m in model.named_modules() if n.endswith("spatial.bn")]
    assert bns and all(bool((m.weight == 0).all()) for m in bns)
    with torch.no_grad():
        for m in bns:
            m.weight.fill_(1.0)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("spatial.conv.weight"))


def test_cbam_twin_adds_one_module_per_block():
    for base in ("resnet18", "resnet50"):
        plain = create_model(base)
        twin = create_model(f"{base}_cbam")
        blocks = [n for n, _ in plain.named_modules() if n.count(".") == 1 and n.startswith("layer")]
        cbams = [n for n, _ in twin.named_modules() if n.endswith(".cbam")]
        assert cbams == [f"{b}.cbam" for b in blocks]
        assert not any(".cbam" in n for n, _ in plain.named_modules())
