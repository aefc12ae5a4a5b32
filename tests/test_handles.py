"""Handle resolution through the real huggingface_hub and kagglehub clients."""

import os

import numpy as np
import pytest
import toy_models
from hub_fixtures import fill_hf_cache, fill_kaggle_cache, kaggle_api  # noqa: F401

import keras_diffusion as kd
from keras_diffusion.presets import handles


@pytest.fixture(scope="module")
def toy_preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "preset"
    task = toy_models.make_toy_task()
    task.save_to_preset(path)
    return str(path), task


def _same_weights(a, b):
    for x, y in zip(a.backbone.weights, b.backbone.weights):
        np.testing.assert_array_equal(np.asarray(x.numpy()), np.asarray(y.numpy()))


def test_local_folder(toy_preset):
    path, task = toy_preset
    _same_weights(task, kd.models.ImageToImage.from_preset(path))


def test_hf_handle_through_offline_cache(toy_preset):
    path, task = toy_preset
    fill_hf_cache("someone/toy-preset", path)
    loaded = kd.models.ImageToImage.from_preset("hf://someone/toy-preset")
    assert type(loaded) is toy_models.ToyImageToImage
    _same_weights(task, loaded)


def test_hf_handle_with_revision(toy_preset, tmp_path):
    path, task = toy_preset
    other = toy_models.make_toy_task()
    other.save_to_preset(tmp_path / "v2")
    fill_hf_cache("someone/toy-revs", path)
    fill_hf_cache("someone/toy-revs", str(tmp_path / "v2"), revision="v2")
    _same_weights(task, kd.models.ImageToImage.from_preset("hf://someone/toy-revs"))
    _same_weights(other, kd.models.ImageToImage.from_preset("hf://someone/toy-revs@v2"))


def test_hf_handle_not_cached_offline_is_clear():
    with pytest.raises(OSError, match="huggingface.co/nobody/missing"):
        kd.models.ImageToImage.from_preset("hf://nobody/missing")


def test_kaggle_versioned_handle_through_cache(toy_preset):
    path, task = toy_preset
    fill_kaggle_cache("keras/toy/keras/toy_preset/2", path)
    loaded = kd.models.ImageToImage.from_preset("kaggle://keras/toy/keras/toy_preset/2")
    _same_weights(task, loaded)


def test_kaggle_unversioned_handle_asks_the_api(toy_preset, kaggle_api):  # noqa: F811
    path, task = toy_preset
    fill_kaggle_cache("keras/toy/keras/latest_preset/3", path)
    kaggle_api.versions[("keras", "toy", "latest_preset")] = 3
    loaded = kd.models.ImageToImage.from_preset(
        "kaggle://keras/toy/keras/latest_preset"
    )
    _same_weights(task, loaded)
    assert any("GetModelInstance" in p for p, _ in kaggle_api.requests)


def test_kaggle_unknown_model_is_clear(kaggle_api):  # noqa: F811
    with pytest.raises(OSError, match="kaggle://keras/toy/keras/nothing"):
        kd.models.ImageToImage.from_preset("kaggle://keras/toy/keras/nothing")


def test_builtin_name_fails_offline_naming_its_sources():
    with pytest.raises(OSError) as e:
        kd.models.ImageToImage.from_preset("stable_diffusion_3.5_medium")
    message = str(e.value)
    assert "stable_diffusion_3.5_medium" in message
    assert "hf://stabilityai/stable-diffusion-3.5-medium" in message
    assert "huggingface.co/stabilityai/stable-diffusion-3.5-medium" in message
    assert "kaggle://keras/stablediffusion-3.5/keras/stable_diffusion_3.5_medium/1" in (
        message
    )


def test_unknown_name_lists_available_names():
    with pytest.raises(ValueError) as e:
        kd.models.ImageToImage.from_preset("stable_diffusion_4")
    assert "stable_diffusion_3_medium" in str(e.value)
    assert "kaggle://" in str(e.value)


def test_missing_local_folder():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kd.models.ImageToImage.from_preset("./no/such/preset")


@pytest.mark.parametrize(
    "handle, expected",
    [
        ("hf://owner", "hf://OWNER/REPO"),
        ("hf://a/b/c", "hf://OWNER/REPO"),
        ("hf://../etc", "hf://OWNER/REPO"),
        ("hf://a/..", "hf://OWNER/REPO"),
        ("hf:///etc/passwd", "hf://OWNER/REPO"),
        ("hf://a/b@", "REVISION"),
        ("hf://a/b@../../x", "REVISION"),
        ("kaggle://a/b", "OWNER/MODEL/FRAMEWORK/VARIATION"),
        ("kaggle://a/b/c/d/e/f", "OWNER/MODEL/FRAMEWORK/VARIATION"),
        ("kaggle://a/b/c/d/latest", "VERSION must be a number"),
        ("kaggle://a/../c/d", "OWNER/MODEL/FRAMEWORK/VARIATION"),
        ("kaggle:///abs/b/c/d", "OWNER/MODEL/FRAMEWORK/VARIATION"),
        ("s3://bucket/key", "Unknown scheme"),
        ("", "non-empty"),
    ],
)
def test_malformed_handles(handle, expected):
    with pytest.raises(ValueError, match=expected.replace("/", "/")) as e:
        handles.parse(handle)
    assert (
        "Expected" in str(e.value)
        or "Use" in str(e.value)
        or "non-empty" in str(e.value)
    )


def test_parse_forms(tmp_path):
    assert handles.parse("hf://a/b").kind == "hf"
    h = handles.parse("hf://a/b@refs-pr-1")
    assert (h.value, h.revision) == ("a/b", "refs-pr-1")
    assert handles.parse("kaggle://a/b/keras/d/4").value == "a/b/keras/d/4"
    assert handles.parse("stable_diffusion_3_medium").kind == "builtin"
    assert handles.parse(str(tmp_path)).kind == "local"
    assert handles.parse(os.fspath(tmp_path)).value == str(tmp_path)
