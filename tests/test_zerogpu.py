"""cbam_viz.zerogpu: spaces.GPU on a ZeroGPU Space, a plain call elsewhere; the model work returns CPU data."""
from __future__ import annotations

import ast
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

from cbam_viz import service, zerogpu
from tests.conftest import make_image, make_service_pair

ROOT = Path(__file__).resolve().parent.parent


def _work(pair):
    return service._model_work(make_image(80, 60), pair, method="gradcam", target=None, layer=None, faithfulness=True)


def test_without_spaces_the_decorator_is_a_no_op(monkeypatch, service_pair):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    assert zerogpu.spaces_module() is None

    def f(x):
        return x + 1

    assert zerogpu.gpu(f) is f
    explanation, drops, timings = _work(service_pair)
    assert {"wait_for_model", "explain", "faithfulness"} <= set(timings) and set(drops) == {"baseline", "cbam"}


def test_with_a_stand_in_spaces_the_model_work_runs_decorated_and_returns_cpu_data(monkeypatch, service_pair):
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
    wrapped = zerogpu.gpu(service._model_work)
    assert wrapped is not service._model_work
    explanation, drops, _ = wrapped(make_image(80, 60), service_pair, method="gradcam", target=None, layer=None,
                                    faithfulness=True)
    assert calls == [30]
    assert all(isinstance(m.cam, np.ndarray) for m in (explanation.baseline, explanation.cbam))
    assert all(d.perturbed.device == torch.device("cpu") for d in drops.values())


def test_the_model_work_functions_are_the_decorated_ones():
    tree = ast.parse((ROOT / "cbam_viz" / "service.py").read_text())
    decorated = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                 and any(ast.unparse(d) == "zerogpu.gpu" for d in n.decorator_list)]
    assert decorated == ["_model_work", "_ablation_work"]


def test_the_gpu_worker_gets_the_served_pair_by_name_and_a_callers_own_pair_as_itself(
        monkeypatch, use_service_pair, tmp_path):
    """ZeroGPU pickles a decorated function's arguments into its GPU worker: models passed there would
    arrive as CPU copies, so the app passes a name and the worker takes its own cache's models."""
    seen = []

    def spy(name):
        real = getattr(service, name)

        def run(*args, **kwargs):
            pair = args[1] if name == "_model_work" else args[0]
            seen.append((name, pair, len(pickle.dumps((args, kwargs)))))
            return real(*args, **kwargs)
        monkeypatch.setattr(service, name, run)

    spy("_model_work")
    spy("_ablation_work")
    batch = service.explain_files([make_image(80, 60)], names=["a.png"], out_root=tmp_path)
    rows = service.ablate_result(batch.results[0].result_id, root=tmp_path)
    assert rows and [(n, p) for n, p, _ in seen] == [("_model_work", "tiny"), ("_ablation_work", "tiny")]
    assert all(size < 100_000 for *_, size in seen)  # a name and a small photo, no models

    own = make_service_pair("mine", trained=False)  # a caller's own pair goes as itself
    service.analyse(make_image(80, 60), pair=own)
    assert seen[-1][1] is own
