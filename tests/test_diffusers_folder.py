"""Loading a diffusers SD3 folder through `from_preset`, and refusing bad ones.

A tiny random-weight reference pipeline (`sd3_fixtures`) is saved once with
`save_pretrained`; each corruption test copies it and breaks one thing. A
failed load must raise an error that names what is wrong, and must write
nothing: not in the folder, not next to it, not in the working directory
and not in the temp directory.
"""

import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import sd3_fixtures
from no_writes import fails_without_writing

from keras_diffusion.converters import diffusers_folder
from keras_diffusion.models import (
    Backbone,
    ImageToImage,
    StableDiffusion3Backbone,
    StableDiffusion3ImageToImage,
    StableDiffusion3Preprocessor,
)

pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

TRANSFORMER_FILE = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
VAE_FILE = os.path.join("vae", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    pipeline = sd3_fixtures.build_reference_pipeline("sd3")
    folder = tmp_path_factory.mktemp("reference") / "diffusers"
    return sd3_fixtures.save_reference_folder(pipeline, folder)


@pytest.fixture(scope="module")
def loaded(source):
    return ImageToImage.from_preset(source)


@pytest.fixture
def broken(source, tmp_path):
    """A fresh copy of the reference folder, to corrupt."""
    folder = tmp_path / "copy" / "diffusers"
    shutil.copytree(source, folder)
    return str(folder)


# ------------------------------------------------------------ loads fine
def test_loads_through_every_entry_point(source, loaded):
    assert type(loaded) is StableDiffusion3ImageToImage
    assert isinstance(loaded.preprocessor, StableDiffusion3Preprocessor)
    task = StableDiffusion3ImageToImage.from_preset(pathlib.Path(source))
    backbone = StableDiffusion3Backbone.from_preset(source)
    base = Backbone.from_preset(source)
    assert type(backbone) is type(base) is type(task.backbone)
    expected = loaded.backbone.get_weights()
    for model in (task.backbone, backbone, base):
        weights = model.get_weights()
        assert len(weights) == len(expected)
        for a, b in zip(weights, expected):
            np.testing.assert_array_equal(a, b)
    assert loaded.backbone.t5 is None and loaded.preprocessor.t5_tokenizer is None
    assert loaded.backbone.height == loaded.backbone.width == sd3_fixtures.TINY_SIZE


def test_reports_progress_per_component(source):
    seen = []
    with diffusers_folder.reporting_progress(seen.append):
        StableDiffusion3Backbone.from_preset(source)
    assert seen == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    StableDiffusion3Backbone.from_preset(source)
    assert len(seen) == 4  # the hook ends with its block


def test_half_precision_variants_are_not_read_twice(broken, loaded):
    # A corrupt fp16 shard next to the plain file must be ignored...
    encoder = os.path.join(broken, "text_encoder")
    with open(
        os.path.join(encoder, "model.fp16-00001-of-00002.safetensors"), "wb"
    ) as f:
        f.write(b"\0" * 64)
    # ... and a component holding only an fp16 variant loads from it.
    tensors = safetensors_numpy.load_file(os.path.join(broken, VAE_FILE))
    os.remove(os.path.join(broken, VAE_FILE))
    safetensors_numpy.save_file(
        {k: v.astype(np.float16) for k, v in tensors.items()},
        os.path.join(broken, "vae", "diffusion_pytorch_model.fp16.safetensors"),
    )
    backbone = StableDiffusion3Backbone.from_preset(broken)
    for a, b in zip(
        backbone.clip_l.get_weights(), loaded.backbone.clip_l.get_weights()
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(backbone.vae.get_weights(), loaded.backbone.vae.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------ corrupt input
def test_truncated_safetensors(broken, monkeypatch, tmp_path):
    path = os.path.join(broken, TRANSFORMER_FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    error = fails_without_writing(
        broken, ImageToImage.from_preset, ValueError, "truncated", monkeypatch, tmp_path
    )
    assert os.path.join("transformer", "diffusion_pytorch_model.safetensors") in str(
        error
    )


@pytest.mark.parametrize(
    "component, file, tensor",
    [
        ("transformer", TRANSFORMER_FILE, "proj_out.weight"),
        ("vae", VAE_FILE, "decoder.conv_in.weight"),
        (
            "text_encoder_2",
            "text_encoder_2/model.safetensors",
            "text_projection.weight",
        ),
    ],
)
def test_tensor_of_the_wrong_shape(
    broken, monkeypatch, tmp_path, component, file, tensor
):
    path = os.path.join(broken, file)
    tensors = safetensors_numpy.load_file(path)
    shape = tensors[tensor].shape
    tensors[tensor] = np.zeros((shape[0] + 1,) + shape[1:], tensors[tensor].dtype)
    safetensors_numpy.save_file(tensors, path)
    error = fails_without_writing(
        broken,
        StableDiffusion3Backbone.from_preset,
        ValueError,
        "shape",
        monkeypatch,
        tmp_path,
    )
    assert repr(tensor) in str(error) and repr(component) in str(error)


@pytest.mark.parametrize("component", ["vae", "tokenizer_2", "text_encoder"])
def test_missing_component_folder(broken, monkeypatch, tmp_path, component):
    shutil.rmtree(os.path.join(broken, component))
    error = fails_without_writing(
        broken,
        ImageToImage.from_preset,
        FileNotFoundError,
        "missing",
        monkeypatch,
        tmp_path,
    )
    assert repr(component) in str(error)


@pytest.mark.parametrize(
    "key, value, named",
    [
        (
            "transformer",
            ["diffusers", "FluxTransformer2DModel"],
            "FluxTransformer2DModel",
        ),
        ("vae", ["diffusers", "AutoencoderTiny"], "AutoencoderTiny"),
        ("controlnet", ["diffusers", "SD3ControlNetModel"], "controlnet"),
        ("_class_name", "FluxImg2ImgPipeline", "FluxImg2ImgPipeline"),
    ],
)
def test_model_index_with_an_unknown_class(
    broken, monkeypatch, tmp_path, key, value, named
):
    import json

    path = os.path.join(broken, "model_index.json")
    with open(path) as f:
        index = json.load(f)
    index[key] = value
    with open(path, "w") as f:
        json.dump(index, f)
    error = fails_without_writing(
        broken, ImageToImage.from_preset, ValueError, named, monkeypatch, tmp_path
    )
    assert "model_index.json" in str(error)


class _Bomb:
    """Unpickling this creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("content", ["random bytes", "pickle that writes a file"])
def test_pickle_only_component_is_never_unpickled(
    broken, monkeypatch, tmp_path, content
):
    os.remove(os.path.join(broken, VAE_FILE))
    marker = tmp_path / "unpickled"
    if content == "random bytes":
        data = np.random.default_rng(0).bytes(4096)
    else:
        data = pickle.dumps(_Bomb(str(marker)))
    with open(os.path.join(broken, "vae", "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(data)
    error = fails_without_writing(
        broken,
        ImageToImage.from_preset,
        ValueError,
        "never unpickle",
        monkeypatch,
        tmp_path,
    )
    assert "diffusion_pytorch_model.bin" in str(error) and "'vae'" in str(error)
    assert not marker.exists()
