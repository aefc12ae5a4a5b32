"""Built-in names resolved through the hubs, and hostile `hf://` repos.

Every remote catalogue entry is resolved three ways, with the real
`huggingface_hub` and `kagglehub` clients against caches of their own
layouts (nothing leaves the machine):

- its Hugging Face repo is cached (a tiny diffusers SD3 standing in): the
  name resolves to that repo's cached conversion, and loads with the
  catalogue's sampling defaults;
- only its Kaggle handle is cached (the keras-hub fixture standing in): the
  name falls back to it;
- nothing is cached: the error names the preset, each source, the file that
  was looked for and where it would have come from.

`sd3_tiny_demo` resolves to the embedded folder without either hub. Then
hostile diffusers repos over `hf://` (a tensor of the wrong shape, a
missing component folder, `model_index.json` naming an unknown class) must
fail naming the problem and leave nothing in the conversion cache.
"""

import json
import os
import shutil

import huggingface_hub
import numpy as np
import pytest
import sd3_fixtures
from hub_fixtures import fill_hf_cache, fill_kaggle_cache, kaggle_api  # noqa: F401

from keras_diffusion.converters.keras_hub_preset import KerasHubPreset
from keras_diffusion.models import ImageToImage, StableDiffusion3ImageToImage
from keras_diffusion.presets import catalogue, handles, hf_conversion
from keras_diffusion.presets.loader import open_preset
from keras_diffusion.presets.preset_io import is_preset

pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

REMOTE = [name for name in catalogue.names() if not catalogue.get(name).get("path")]
KERAS_HUB_PRESET = os.path.join(
    os.path.dirname(__file__), "fixtures", "keras_hub_sd3_tiny"
)


def _sources(name):
    sources = catalogue.get(name)["sources"]
    hf = [s[len("hf://") :] for s in sources if s.startswith("hf://")]
    kaggle = [s[len("kaggle://") :] for s in sources if s.startswith("kaggle://")]
    assert len(hf) == len(kaggle) == 1, sources
    return hf[0], kaggle[0]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face, Kaggle and conversion caches for one test."""
    hf = str(tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_CACHE", hf)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hf)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    monkeypatch.setenv("KERAS_DIFFUSION_CACHE", str(tmp_path / "converted"))
    return tmp_path


@pytest.fixture(scope="module")
def diffusers_repo(tmp_path_factory):
    pipeline = sd3_fixtures.build_reference_pipeline("sd3")
    folder = tmp_path_factory.mktemp("repo") / "diffusers"
    return sd3_fixtures.save_reference_folder(pipeline, folder)


def test_every_remote_entry_is_listed():
    assert set(REMOTE) == {
        "stable_diffusion_3_medium",
        "stable_diffusion_3.5_medium",
        "stable_diffusion_3.5_large",
        "stable_diffusion_3.5_large_turbo",
    }


@pytest.mark.parametrize("name", REMOTE)
def test_resolves_to_the_cached_conversion_of_its_hf_repo(name, caches, diffusers_repo):
    repo, _ = _sources(name)
    snapshot = fill_hf_cache(repo, diffusers_repo)
    before = len(hf_conversion.conversions)
    path = handles.resolve(name)
    assert path == hf_conversion.converted_dir(repo, os.path.basename(snapshot))
    assert is_preset(path) and len(hf_conversion.conversions) == before + 1
    task = ImageToImage.from_preset(name)  # from the cache: no new conversion
    assert len(hf_conversion.conversions) == before + 1
    assert type(task) is StableDiffusion3ImageToImage
    assert task.sampling == catalogue.get(name)["sampling"]


@pytest.mark.parametrize("name", REMOTE)
def test_falls_back_to_its_kaggle_handle(name, caches):
    _, handle = _sources(name)
    target = fill_kaggle_cache(handle, KERAS_HUB_PRESET)
    assert handles.resolve(name) == target
    assert isinstance(open_preset(name), KerasHubPreset)
    if name == "stable_diffusion_3.5_large_turbo":
        task = ImageToImage.from_preset(name)
        assert task.sampling["num_steps"] == 4
        assert task.sampling["guidance_scale"] == 0.0


@pytest.mark.parametrize("name", REMOTE)
def test_offline_failure_names_the_file_and_where_from(name, caches, kaggle_api):  # noqa: F811
    repo, handle = _sources(name)
    with pytest.raises(OSError) as error:
        ImageToImage.from_preset(name)
    message = str(error.value)
    assert repr(name) in message
    assert f"hf://{repo}" in message and f"https://huggingface.co/{repo}" in message
    assert "model_index.json" in message  # the file the resolution looked for
    assert f"kaggle://{handle}" in message and "Kaggle" in message
    assert not os.path.exists(caches / "converted")


def test_embedded_demo_needs_no_hub(caches):
    entry = catalogue.get("sd3_tiny_demo")
    assert handles.resolve("sd3_tiny_demo") == entry["path"]
    task = ImageToImage.from_preset("sd3_tiny_demo")
    assert task.sampling == entry["sampling"]
    for cache in ("converted", "kaggle"):
        assert not (caches / cache).exists()


# ------------------------------------------------- hostile repos over hf://
def _files(path):
    return sorted(
        os.path.relpath(os.path.join(root, name), path)
        for root, _, names in os.walk(path)
        for name in names
    )


def _wrong_shape(folder):
    path = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    tensors = safetensors_numpy.load_file(path)
    shape = tensors["proj_out.weight"].shape
    tensors["proj_out.weight"] = np.zeros((shape[0] + 1, shape[1]), np.float32)
    safetensors_numpy.save_file(tensors, path)


def _unknown_class(folder):
    path = os.path.join(folder, "model_index.json")
    with open(path) as f:
        index = json.load(f)
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    with open(path, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize(
    "breakage, error, named",
    [
        (_wrong_shape, ValueError, ["'proj_out.weight'", "shape", "'transformer'"]),
        (
            lambda folder: shutil.rmtree(os.path.join(folder, "vae")),
            FileNotFoundError,
            ["'vae'"],
        ),
        (_unknown_class, ValueError, ["FluxTransformer2DModel", "model_index.json"]),
    ],
    ids=["wrong-shape", "missing-component-folder", "unknown-class"],
)
def test_hostile_repo_writes_nothing_to_the_cache(
    breakage, error, named, caches, diffusers_repo
):
    folder = caches / "repo"
    shutil.copytree(diffusers_repo, folder)
    breakage(str(folder))
    fill_hf_cache("someone/hostile", str(folder))
    before = len(hf_conversion.conversions)
    with pytest.raises(error) as info:
        ImageToImage.from_preset("hf://someone/hostile")
    for part in named:
        assert part in str(info.value)
    assert len(hf_conversion.conversions) == before
    converted = caches / "converted"
    assert not converted.exists() or _files(converted) == []
