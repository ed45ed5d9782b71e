"""Shared fixtures: seeded tiny images and a tiny baseline/CBAM pair (3 classes, 64 px input)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz.models import create_model
from cbam_viz.pair import LoadedModel, ModelPair

TINY_CLASSES = ("cat", "dog", "bird")


def make_image(width: int = 80, height: int = 60, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A seeded random-noise image (smooth enough that CAMs are not degenerate)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)
    return img if mode == "RGB" else img.convert(mode)


def make_model(arch: str, *, num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A seeded model whose spatial gates are not uniform (their BN starts at weight 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch, num_classes=num_classes)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("spatial.bn"):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def make_loaded(arch: str, *, input_size: int = 64, seed: int = 0) -> LoadedModel:
    return LoadedModel(
        name=f"tiny {arch}", arch=arch, model=make_model(arch, seed=seed), classes=TINY_CLASSES,
        class_ids=("c0", "c1", "c2"), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        input_size=input_size, trained=False, record=None, device=torch.device("cpu"),
    )


def make_pair(input_size: int = 64) -> ModelPair:
    return ModelPair(name=f"tiny{input_size}", baseline=make_loaded("resnet18", input_size=input_size),
                     cbam=make_loaded("resnet18_cbam", input_size=input_size, seed=1))


def assert_no_hooks(model: torch.nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(m, attr, {}), f"{name or 'model'}.{attr} left behind"


@pytest.fixture(scope="session")
def tiny_pair() -> ModelPair:
    return make_pair(64)


@pytest.fixture(scope="session")
def micro_pair() -> ModelPair:
    """32 px input: for the perturbation methods (hundreds of forwards)."""
    return make_pair(32)


@pytest.fixture
def image() -> Image.Image:
    return make_image(80, 60)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: several times faster for tiny inputs on a small, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
