"""Several weights folders: a user's models beside the shipped ones, in the library, the app and the API."""
from __future__ import annotations

import os

import pytest

from cbam_viz.engine.lineup import IMAGENET_LINEUP, UNTRAINED_LINEUP, default_lineup_name, lineup_names, lineup_specs, load_lineup
from cbam_viz.engine.loading import clear_cache
from cbam_viz.models.weights import WEIGHTS_DIR_ENV, read_manifest, resolve_weights_dir, weights_dirs
from tests.bad_inputs import write_test_weights
from tests.e2e_helpers import make_image, running_app
from tests.own_models import USER_CLASSES, USER_LINEUP, write_user_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return write_test_weights(root / "shipped"), write_user_folder(root / "user")


@pytest.fixture
def both(folders, monkeypatch):
    shipped, user = folders
    monkeypatch.setenv(WEIGHTS_DIR_ENV, f"{shipped}{os.pathsep}{user}")
    clear_cache()
    yield shipped, user
    clear_cache()


def test_the_environment_names_several_folders_in_order(both):
    shipped, user = both
    assert weights_dirs() == [shipped, user]
    assert resolve_weights_dir() == shipped  # where commands write by default: the first
    assert weights_dirs(f"{user}{os.pathsep}") == [user]


def test_lineups_of_every_folder_are_listed_the_first_folders_default_first(both):
    shipped, user = both
    own = next(iter(read_manifest(shipped)["pairs"]))
    assert list(lineup_specs()) == [own, USER_LINEUP]
    assert default_lineup_name() == own
    assert lineup_names() == [own, USER_LINEUP, IMAGENET_LINEUP, UNTRAINED_LINEUP]


def test_a_lineup_of_the_second_folder_loads_from_it(both):
    shipped, user = both
    lineup = load_lineup(USER_LINEUP)
    assert lineup.names == ["pets_resnet18", "pets_cbam"] and lineup.reference == "pets_resnet18"
    cbam = lineup.member("pets_cbam")
    assert cbam.classes == USER_CLASSES and cbam.input_size == 64
    assert cbam.record.sha256 == read_manifest(user)["models"]["pets_cbam"]["sha256"]


def test_an_earlier_folder_hides_a_lineup_of_the_same_name(folders, tmp_path, monkeypatch):
    shipped, user = folders
    again = write_user_folder(tmp_path / "again")  # same lineup name, other files
    monkeypatch.setenv(WEIGHTS_DIR_ENV, f"{user}{os.pathsep}{again}")
    clear_cache()
    assert list(lineup_specs()) == [USER_LINEUP]
    cbam = load_lineup(USER_LINEUP).member("pets_cbam")
    assert cbam.record.sha256 == read_manifest(user)["models"]["pets_cbam"]["sha256"]
    clear_cache()


def test_an_unknown_lineup_names_every_folder(both):
    shipped, user = both
    with pytest.raises(KeyError) as err:
        load_lineup("nope")
    assert str(shipped / "manifest.json") in str(err.value) and str(user / "manifest.json") in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_explain_endpoint_explains_a_users_lineup_from_a_second_folder(folders, tmp_path):
    from gradio_client import Client, handle_file

    shipped, user = folders
    photo = make_image(tmp_path / "pet.png", size=(96, 80))
    env = {WEIGHTS_DIR_ENV: f"{shipped}{os.pathsep}{user}"}
    with running_app(log_name="test_weights_folders-server.log", env=env) as app:
        client = Client(app.url, verbose=False)
        info = client.predict(USER_LINEUP, api_name="/info")
        assert USER_LINEUP in info["lineups"] and info["classes"] == list(USER_CLASSES)
        assert [m["name"] for m in info["members"]] == ["pets_resnet18", "pets_cbam"]
        summary, *_ = client.predict(handle_file(str(photo)), "gradcam", "dog", "auto (last block)", 0.5,
                                     USER_LINEUP, api_name="/explain")
        assert summary["lineup"] == USER_LINEUP and summary["members"] == ["pets_resnet18", "pets_cbam"]
        for name in summary["members"]:
            assert {p["label"] for p in summary["models"][name]["predictions"]} <= set(USER_CLASSES)
            assert summary["models"][name]["target"]["label"] == "dog"
