"""cbam_viz.zerogpu: spaces.GPU on a ZeroGPU Space, a plain call elsewhere; the model work returns CPU data."""
from __future__ import annotations

import ast
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cbam_viz import service, zerogpu
from cbam_viz.engine.controls import check_controls
from cbam_viz.service import analysis, results
from tests.conftest import make_image, make_service_lineup

ROOT = Path(__file__).resolve().parent.parent


def _work(lineup, work=None):
    work = work or analysis._model_work
    return work(make_image(80, 60), lineup, check_controls(lineup, method="gradcam"), faithfulness=True)


def test_without_spaces_the_decorator_is_a_no_op(monkeypatch, service_lineup):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    assert zerogpu.spaces_module() is None

    def f(x):
        return x + 1

    assert zerogpu.gpu(f) is f
    explanation, drops, timings = _work(service_lineup)
    assert {"wait_for_model", "explain", "faithfulness"} <= set(timings)
    assert list(drops) == list(explanation.models) == service_lineup.names


def test_the_model_work_of_a_three_member_lineup_covers_every_member(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)
    lineup = make_service_lineup("family", archs=("resnet18", "resnet18_se", "resnet18_cbam"))
    explanation, drops, _ = _work(lineup)
    assert list(explanation.models) == list(drops) == lineup.names and explanation.reference == "resnet18-tiny"
    assert all(isinstance(m.cam, np.ndarray) for m in explanation.models.values())


def test_checked_controls_travel_pickled_to_a_gpu_worker_and_stay_read_only(service_lineup):
    controls = check_controls(service_lineup, method="Grad-CAM++", target="church", layer="layer3.1", alpha=0.3)
    again = pickle.loads(pickle.dumps(controls))
    assert again == controls and dict(again.targets) == {n: 1 for n in service_lineup.names}
    with pytest.raises(TypeError):
        again.targets["resnet18-tiny"] = 0  # read-only, as before the trip


def test_with_a_stand_in_spaces_the_model_work_runs_decorated_and_returns_cpu_data(monkeypatch, service_lineup):
    calls = []

    def GPU(duration=None):  # noqa: N802  the real spaces.GPU's name
        def decorate(fn):
            def run(*args, **kwargs):
                calls.append(duration)
                return fn(*args, **kwargs)
            return run
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv(zerogpu.DURATION_ENV, "30")
    wrapped = zerogpu.gpu(analysis._model_work)
    assert wrapped is not analysis._model_work
    explanation, drops, _ = _work(service_lineup, wrapped)
    assert calls == [30]
    assert list(explanation.models) == service_lineup.names
    assert all(isinstance(m.cam, np.ndarray) for m in explanation.models.values())
    assert all(d.perturbed.device == torch.device("cpu") for d in drops.values())


def test_the_model_work_functions_are_the_decorated_ones():
    decorated = []
    for path in sorted((ROOT / "cbam_viz").rglob("*.py")):
        tree = ast.parse(path.read_text())
        decorated += [(path.relative_to(ROOT).as_posix(), n.name) for n in ast.walk(tree)
                      if isinstance(n, ast.FunctionDef) and any(ast.unparse(d) == "zerogpu.gpu" for d in n.decorator_list)]
    assert decorated == [("cbam_viz/service/analysis.py", "_model_work"), ("cbam_viz/service/results.py", "_ablation_work")]


def test_the_gpu_worker_gets_the_served_lineup_by_name_and_a_callers_own_lineup_as_itself(
        monkeypatch, use_service_lineup, tmp_path):
    """ZeroGPU pickles a decorated function's arguments into its GPU worker: models passed there would
    arrive as CPU copies, so the app passes a name and the worker takes its own cache's models."""
    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def run(*args, **kwargs):
            lineup = args[1] if name == "_model_work" else args[0]
            seen.append((name, lineup, len(pickle.dumps((args, kwargs)))))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, run)

    spy(analysis, "_model_work")
    spy(results, "_ablation_work")
    batch = service.explain_files([make_image(80, 60)], names=["a.png"], out_root=tmp_path)
    rows = service.ablate_result(batch.results[0].result_id, root=tmp_path)
    assert rows and [(n, p) for n, p, _ in seen] == [("_model_work", "tiny"), ("_ablation_work", "tiny")]
    assert all(size < 100_000 for *_, size in seen)  # a name and a small photo, no models

    own = make_service_lineup("mine", trained=False)  # a caller's own lineup goes as itself
    service.analyse(make_image(80, 60), lineup=own)
    assert seen[-1][1] is own
