"""Shared fixtures: seeded tiny images and tiny lineups (a plain ResNet-18 and its CBAM twin; 3 classes, 64 px)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cbam_viz.models import create_model
from cbam_viz.engine.lineup import Lineup
from cbam_viz.engine.loading import LoadedModel

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


def make_lineup(input_size: int = 64, archs=("resnet18", "resnet18_cbam")) -> Lineup:
    """A lineup of tiny members, one per ``arch`` (seeds 0, 1, ...); the first is the reference."""
    members = tuple(make_loaded(a, input_size=input_size, seed=i) for i, a in enumerate(archs))
    return Lineup(name=f"tiny{input_size}" + ("" if len(archs) == 2 else f"x{len(archs)}"), members=members,
                  reference=members[0].name)


def assert_no_hooks(model: torch.nn.Module) -> None:
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(m, attr, {}), f"{name or 'model'}.{attr} left behind"


@pytest.fixture(scope="session")
def tiny_lineup() -> Lineup:
    """ResNet-18 (the reference) and ResNet-18-CBAM, 64 px."""
    return make_lineup(64)


@pytest.fixture(scope="session")
def family_lineup() -> Lineup:
    """Three tiny members, one without gates: ResNet-18 (reference), SE, CBAM; 64 px."""
    return make_lineup(64, ("resnet18", "resnet18_se", "resnet18_cbam"))


@pytest.fixture(scope="session")
def micro_lineup() -> Lineup:
    """32 px input: for the perturbation methods (hundreds of forwards)."""
    return make_lineup(32)


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


@pytest.fixture
def boxed_folder(tmp_path):
    """An ImageFolder split ``val/c0..c2`` (2 images each, varied sizes) and its box CSV.

    Every image has one box; ``c1/im1.png`` has a second, fractional one; ``c2/nobox.png`` has
    none, so it is not evaluated. Returns ``(data folder, csv path)``.
    """
    data = tmp_path / "val"
    rows = ["wnid,file,xmin,ymin,xmax,ymax"]
    for c in range(3):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(2):
            w, h = (48, 40) if i == 0 else (40, 56)
            make_image(w, h, seed=10 * c + i).save(data / f"c{c}" / f"im{i}.png")
            rows.append(f"c{c},im{i}.png,4,6,{w - 10},{h - 4}")
    rows.append("c1,im1.png,0,0,12.5,10")
    make_image(40, 40, seed=99).save(data / "c2" / "nobox.png")  # no box: not evaluated
    csv = tmp_path / "boxes.csv"
    csv.write_text("\n".join(rows) + "\n")
    return data, csv


@pytest.fixture
def no_cbam_env(monkeypatch):
    """No ``CBAM_VIZ_*`` variable of the caller's shell (data, report, weights, device) leaks into a test."""
    import os

    for name in [n for n in os.environ if n.startswith("CBAM_VIZ_")]:
        monkeypatch.delenv(name)


# ----------------------------------------------------------------- service / app / CLI fixtures

SERVICE_CLASSES = ("tench", "church", "golf ball")


def make_service_lineup(name: str = "tiny", *, trained: bool = False, archs=("resnet18", "resnet18_cbam")) -> Lineup:
    """A tiny 64 px lineup on three Imagenette names (class ids ``n0``..``n2``), seeded models; the
    first member is the reference."""
    def loaded(arch: str, seed: int) -> LoadedModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(arch, num_classes=len(SERVICE_CLASSES)).eval()
        return LoadedModel(
            name=f"{arch}-tiny", arch=arch, model=model, classes=SERVICE_CLASSES,
            class_ids=tuple(f"n{i}" for i in range(len(SERVICE_CLASSES))), mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225), input_size=64, trained=trained, record=None, device=torch.device("cpu"),
        )

    members = tuple(loaded(arch, i) for i, arch in enumerate(archs))
    return Lineup(name=name, members=members, reference=members[0].name)


@pytest.fixture(scope="session")
def service_lineup() -> Lineup:
    """The untrained tiny lineup of :func:`make_service_lineup` (one per test session)."""
    return make_service_lineup("tiny", trained=False)


def serve_lineup(monkeypatch, lineup: Lineup, asked: list | None = None) -> Lineup:
    """Every request of the service (and of its callers: the CLI, the app) gets ``lineup``, whatever
    name it asks for; the names asked are appended to ``asked``."""
    from cbam_viz import service
    from cbam_viz.service import access

    def get_lineup(name=None):
        if asked is not None:
            asked.append(name)
        return lineup

    monkeypatch.setattr(access, "get_lineup", get_lineup)
    monkeypatch.setattr(service, "get_lineup", get_lineup)
    return lineup


@pytest.fixture
def use_service_lineup(monkeypatch, service_lineup) -> Lineup:
    """The service's lineup is :func:`service_lineup` (no weights, no manifest involved)."""
    return serve_lineup(monkeypatch, service_lineup)


@pytest.fixture(scope="module")
def no_cbam_env_module():
    """:func:`no_cbam_env` for a whole module, for module-scoped fixtures (e.g. a live server)."""
    import os

    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("CBAM_VIZ_")]:
            mp.delenv(name)
        yield


def run_on_threads(fn, jobs, threads: int = 8) -> list:
    """``fn(job)`` for every job on ``threads`` threads that start together; results in job order.

    Each worker waits once for all the others (so the first ``threads`` calls really overlap),
    then runs freely. No time limit: with at least ``threads`` jobs every worker gets one, so the
    wait always ends.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(jobs)
    assert len(jobs) >= threads, "fewer jobs than threads: some worker would wait forever"
    barrier = threading.Barrier(threads)
    started = threading.local()

    def call(job):
        if not getattr(started, "done", False):
            started.done = True
            barrier.wait()
        return fn(job)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(call, jobs))
