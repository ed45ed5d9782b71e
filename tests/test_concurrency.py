"""Concurrent requests give the same answers as one-by-one requests, and leave no hooks behind.

Library level: 16 explanations (each a different image, CAM method and target) on 8 threads
sharing one lineup, through :func:`cbam_viz.engine.explain.explain` and through
:func:`cbam_viz.service.analyse`; a three-member lineup the same way; and two manifest lineups that
share their records (so their models are the same objects) explained at once. Every forward over a model holds that model's
one lock (:func:`cbam_viz.engine.locks.model_lock`). Server level (slow): 200 requests at concurrency 8
against the live app; every answer must be the one for its own image (name and size echoed,
predictions equal to the in-process ones). No test has a time limit.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from cbam_viz import service
from cbam_viz.engine.explain import explain
from cbam_viz.engine.lineup import load_lineup
from cbam_viz.engine.loading import WEIGHTS_DIR_ENV, clear_cache
from cbam_viz.engine.locks import model_lock
from cbam_viz.models.weights import read_manifest, update_manifest
from tests.bad_inputs import TEST_PAIR, good_image, write_test_weights
from tests.conftest import assert_no_hooks, make_image, run_on_threads
from tests.e2e_helpers import running_app

pytestmark = pytest.mark.usefixtures("no_cbam_env")

N_REQUESTS = 16
N_THREADS = 8
METHODS = ("gradcam", "gradcam++", "layercam", "eigencam")


def _jobs():
    """Request i: its own image size and content, one of four methods, a target every third time."""
    return [
        dict(image=make_image(48 + 4 * i, 40 + 3 * (i % 5), seed=100 + i), method=METHODS[i % len(METHODS)],
             target=(i % 3) if i % 3 == 1 else None)
        for i in range(N_REQUESTS)
    ]


def _assert_same_model_explanation(a, b, where: str) -> None:
    assert [p.index for p in a.predictions] == [p.index for p in b.predictions], where
    np.testing.assert_allclose([p.prob for p in a.predictions], [p.prob for p in b.predictions], atol=1e-5,
                               err_msg=where)
    assert a.target == b.target, where
    np.testing.assert_allclose(a.cam, b.cam, atol=1e-4, err_msg=where)
    assert a.spatial_attention.keys() == b.spatial_attention.keys()
    for k in a.spatial_attention:
        np.testing.assert_allclose(a.spatial_attention[k], b.spatial_attention[k], atol=1e-5, err_msg=f"{where} {k}")
        np.testing.assert_allclose(a.channel_attention[k], b.channel_attention[k], atol=1e-5, err_msg=f"{where} {k}")


def _assert_same_members(a, b, where: str) -> None:
    """Two explanations of one image: the same members in the same order, each explained alike."""
    assert list(a.models) == list(b.models) and a.reference == b.reference, where
    for name in a.models:
        _assert_same_model_explanation(a.models[name], b.models[name], f"{where} {name}")


def _run_threads(fn, jobs):
    """Run fn(job) for every job on N_THREADS threads released at once; return results in order."""
    return run_on_threads(fn, jobs, threads=N_THREADS)


def test_explain_on_8_threads_equals_one_by_one(tiny_lineup):
    jobs = _jobs()
    run = lambda job: explain(job["image"], tiny_lineup, method=job["method"], target=job["target"])[0]  # noqa: E731
    sequential = [run(job) for job in jobs]
    concurrent = _run_threads(run, jobs)
    assert len(concurrent) == N_REQUESTS
    for i, (s, c) in enumerate(zip(sequential, concurrent)):
        assert c.image_size == jobs[i]["image"].size == s.image_size
        assert c.method == jobs[i]["method"]
        _assert_same_members(s, c, f"request {i}")
    # Different images really give different answers (the comparison above could not pass by accident).
    last = tiny_lineup.members[-1].name
    assert len({round(s.models[last].predictions[0].prob, 6) for s in sequential}) > N_REQUESTS // 2
    for m in tiny_lineup.members:
        assert_no_hooks(m.model)


@pytest.mark.parametrize("lineup_fixture", ["tiny_lineup", "family_lineup"])
def test_service_analyse_on_8_threads_equals_one_by_one(lineup_fixture, request):
    lineup = request.getfixturevalue(lineup_fixture)
    jobs = _jobs()

    def run(job):
        a = service.analyse(job["image"], lineup=lineup, method=job["method"], target=job["target"],
                            name=f"img{job['image'].size}")
        return a

    sequential = [run(job) for job in jobs]
    concurrent = _run_threads(run, jobs)
    for i, (s, c) in enumerate(zip(sequential, concurrent)):
        assert c.name == s.name and c.image.size == jobs[i]["image"].size
        assert list(c.summary["models"]) == lineup.names
        for name in lineup.names:
            assert [p["index"] for p in c.summary["models"][name]["predictions"]] == \
                [p["index"] for p in s.summary["models"][name]["predictions"]]
        _assert_same_members(s.explanation, c.explanation, f"request {i}")
        assert np.array_equal(np.asarray(s.composite), np.asarray(c.composite)), f"request {i} composite"
    for m in lineup.members:
        assert_no_hooks(m.model)


def test_no_hooks_after_a_failing_request_among_others(tiny_lineup):
    """One failing request among seven good ones: it fails alone, and no hook is left on any model."""
    jobs = _jobs()[:8]
    jobs[3] = dict(jobs[3], target=[0, 1])  # two targets for one image: explain raises ValueError

    def run(job):
        try:
            return explain(job["image"], tiny_lineup, method=job["method"], target=job["target"])[0]
        except ValueError as err:
            return err

    results = _run_threads(run, jobs)
    assert isinstance(results[3], ValueError)
    assert all(not isinstance(r, Exception) for i, r in enumerate(results) if i != 3)
    for m in tiny_lineup.members:
        assert_no_hooks(m.model)


SHARED_LINEUP = "tiny64-again"


@pytest.fixture
def shared_lineups(tmp_path, monkeypatch):
    """A weights folder whose two lineups (an old pair and a lineup of the same two records)
    name the same two records, as the service's default folder."""
    weights = write_test_weights(tmp_path / "weights")
    spec = read_manifest(weights)["pairs"][TEST_PAIR]
    members = [spec["baseline"], spec["cbam"]]
    update_manifest(weights, lineup=(SHARED_LINEUP, {"members": members, "reference": spec["baseline"]}))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(weights))
    clear_cache()
    a, b = load_lineup(TEST_PAIR), load_lineup(SHARED_LINEUP)
    assert a.names == b.names
    assert all(ma.model is mb.model for ma, mb in zip(a.members, b.members))  # one LoadedModel each
    yield a, b
    clear_cache()


def test_two_lineups_sharing_models_on_8_threads_equal_one_by_one(shared_lineups):
    """Both lineups' requests at once (explanation + faithfulness forwards) on the very same modules:
    predictions, CAMs, attention and faithfulness equal the one-by-one ones."""
    jobs = [dict(job, lineup_name=(TEST_PAIR, SHARED_LINEUP)[i % 2]) for i, job in enumerate(_jobs())]

    def run(job):
        return service.analyse(job["image"], lineup_name=job["lineup_name"], method=job["method"],
                               target=job["target"])

    sequential = [run(job) for job in jobs]
    concurrent = _run_threads(run, jobs)
    for i, (s, c) in enumerate(zip(sequential, concurrent)):
        assert c.lineup_name == s.lineup_name == jobs[i]["lineup_name"]
        _assert_same_members(s.explanation, c.explanation, f"request {i}")
        assert list(c.summary["faithfulness"]["models"]) == shared_lineups[0].names
        for name in shared_lineups[0].names:
            want, got = s.summary["faithfulness"]["models"][name], c.summary["faithfulness"]["models"][name]
            np.testing.assert_allclose([got["prob_before"], got["prob_after"]],
                                       [want["prob_before"], want["prob_after"]], atol=1e-5, err_msg=f"request {i}")
    for m in shared_lineups[0].members:
        assert_no_hooks(m.model)


def test_every_forward_of_a_request_holds_its_model_lock(tiny_lineup):
    """The explanation's passes and the faithfulness forwards alike: a forward outside its model's
    lock could fire another thread's hooks (the check does not depend on timing)."""
    unlocked = []

    def spy(module, args):
        if not model_lock(module)._is_owned():  # the RLock's own "held by this thread?" check
            unlocked.append(type(module).__name__)

    handles = [m.model.register_forward_pre_hook(spy) for m in tiny_lineup.members]
    try:
        for method in ("gradcam", "scorecam"):  # scorecam: the library's own batched forwards
            service.analyse(make_image(40, 32, seed=7), lineup=tiny_lineup, method=method, layer="layer2.1")
    finally:
        for h in handles:
            h.remove()
    assert not unlocked, f"{len(unlocked)} forwards ran without their model's lock: {unlocked[:4]}"
    for m in tiny_lineup.members:
        assert_no_hooks(m.model)


# -------------------------------------------------------------------------------- live server

LOAD_REQUESTS = 200
LOAD_CONCURRENCY = 8


@pytest.mark.slow
def test_200_requests_at_concurrency_8_all_right(tmp_path):
    from gradio_client import Client, handle_file

    weights = write_test_weights(tmp_path / "weights")
    folder = tmp_path / "images"
    folder.mkdir()
    # Image i is (40 + i) pixels wide: its width alone says which request an answer belongs to.
    paths = [good_image(folder / f"img_{i:03d}.png", seed=1000 + i, size=(40 + i, 30 + (7 * i) % 41))
             for i in range(LOAD_REQUESTS)]

    # The expected answer of each image, computed in this process with the same weights.
    lineup = load_lineup(TEST_PAIR, weights_dir=weights)
    expected = []
    for start in range(0, LOAD_REQUESTS, 25):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + 25]]
        expected += explain(images, lineup)
    last = lineup.members[-1].name
    distinct = {tuple(round(p.prob, 4) for p in e.models[last].predictions[:2]) for e in expected}
    assert len(distinct) > LOAD_REQUESTS // 2  # answers differ per image, so a mix-up would show

    with running_app(env={"CBAM_VIZ_WEIGHTS_DIR": str(weights)}, log_name="load-server.log") as app:
        local = threading.local()

        def request(i: int):
            if not hasattr(local, "client"):
                local.client = Client(app.url, verbose=False)
            try:
                out = local.client.predict(image=handle_file(str(paths[i])), api_name="/explain")
            except Exception as err:  # noqa: BLE001  counted, reported below
                return i, err
            return i, out[0]

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=LOAD_CONCURRENCY) as pool:
            answers = list(pool.map(request, range(LOAD_REQUESTS)))
        elapsed = time.monotonic() - t0
        assert app.proc.poll() is None, app.log_tail()

    errors = [(i, a) for i, a in answers if isinstance(a, Exception)]
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    assert sorted(i for i, _ in answers) == list(range(LOAD_REQUESTS))  # none lost
    for i, summary in answers:
        img = summary["image"]
        assert img["name"] == paths[i].name and img["analysed_size"] == list(Image.open(paths[i]).size), i
        assert list(summary["models"]) == lineup.names, i
        for name in lineup.names:
            got = summary["models"][name]["predictions"]
            want = expected[i].models[name].predictions
            assert [g["index"] for g in got] == [w.index for w in want], (i, name)
            np.testing.assert_allclose([g["prob"] for g in got], [w.prob for w in want], atol=1e-4,
                                       err_msg=f"request {i} {name}")
    print(f"{LOAD_REQUESTS} requests at concurrency {LOAD_CONCURRENCY}: {elapsed:.1f}s")
