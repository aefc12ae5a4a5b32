"""Corrupt and hostile Stability single files fail naming the problem.

Each test corrupts a fresh copy of the tiny SD3.5 repository folder of
`single_file_fixtures` (truncated file, tensors of the wrong shape, missing
or foreign tensors, a missing text encoder, two model files, a pickle) and
checks that `from_preset` raises an error naming the file and the tensor,
and writes nothing: not next to the checkpoint, not in the working or the
temporary directory. Loading the intact files is `test_single_file.py`.
"""

import os
import pickle
import shutil

import numpy as np
import pytest
import single_file_fixtures as sff
from no_writes import fails_without_writing

from keras_diffusion.models import ImageToImage

pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    """(pipeline, diffusers folder, Stability repository folder)."""
    return sff.sd35_case(tmp_path_factory.mktemp("sd35"))


def _fails_without_writing(preset, error, match, monkeypatch, tmp_path):
    """`from_preset(preset)` fails with `error`, and writes nothing."""
    failure = fails_without_writing(
        preset, ImageToImage.from_preset, error, match, monkeypatch, tmp_path
    )
    return str(failure)


@pytest.fixture
def broken(sd35, tmp_path):
    """A fresh copy of the Stability-layout folder, to corrupt."""
    folder = tmp_path / "copy" / "stability"
    shutil.copytree(sd35[2], folder)
    return str(folder)


def _rewrite(path, change):
    tensors = safetensors_numpy.load_file(path)
    change(tensors)
    safetensors_numpy.save_file(tensors, path)


def test_truncated_file(broken, monkeypatch, tmp_path):
    path = os.path.join(broken, "sd3.5_medium.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    message = _fails_without_writing(
        path, ValueError, "truncated", monkeypatch, tmp_path
    )
    assert path in message


@pytest.mark.parametrize(
    "file, tensor",
    [
        ("sd3.5_medium.safetensors", "model.diffusion_model.final_layer.linear.weight"),
        (
            "sd3.5_medium.safetensors",
            "model.diffusion_model.joint_blocks.2.x_block.attn.qkv.weight",
        ),
        (
            "sd3.5_medium.safetensors",
            "first_stage_model.decoder.up.0.block.0.conv1.weight",
        ),
        (
            "text_encoders/clip_g.safetensors",
            "text_model.encoder.layers.1.mlp.fc2.weight",
        ),
    ],
)
def test_tensor_of_the_wrong_shape(broken, monkeypatch, tmp_path, file, tensor):
    def grow(tensors):
        shape = tensors[tensor].shape
        tensors[tensor] = np.zeros((shape[0] + 3,) + shape[1:], np.float32)

    path = os.path.join(broken, file)
    _rewrite(path, grow)
    message = _fails_without_writing(broken, ValueError, "shape", monkeypatch, tmp_path)
    assert repr(tensor) in message and path in message


@pytest.mark.parametrize(
    "tensor, named",
    [
        (
            "model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight",
            "'model.diffusion_model.joint_blocks.1.x_block.mlp.fc2.weight'",
        ),
        (
            "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.bias",
            "'model.diffusion_model.joint_blocks.0.context_block.attn.qkv.bias'",
        ),
        (
            "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
            "'first_stage_model.decoder.up.1.block.0.nin_shortcut.weight'",
        ),
        ("model.diffusion_model.pos_embed", "'pos_embed'"),
    ],
)
def test_missing_tensor(broken, monkeypatch, tmp_path, tensor, named):
    path = os.path.join(broken, "sd3.5_medium.safetensors")
    _rewrite(path, lambda tensors: tensors.pop(tensor))
    message = _fails_without_writing(
        broken, ValueError, "missing", monkeypatch, tmp_path
    )
    assert named in message


def test_missing_text_encoder(broken, monkeypatch, tmp_path):
    os.remove(os.path.join(broken, "text_encoders", "clip_g.safetensors"))
    message = _fails_without_writing(
        broken, FileNotFoundError, "clip_g", monkeypatch, tmp_path
    )
    assert "clip_g.safetensors" in message and "text_encoders" in message


def test_foreign_tensors_are_refused(broken, monkeypatch, tmp_path):
    path = os.path.join(broken, "sd3.5_medium.safetensors")
    _rewrite(path, lambda tensors: tensors.update(lora_unet_x=np.zeros(2, "float32")))
    message = _fails_without_writing(path, ValueError, "no SD3", monkeypatch, tmp_path)
    assert "lora_unet_x" in message


def test_not_an_sd3_file(broken, monkeypatch, tmp_path):
    path = os.path.join(broken, "text_encoders", "clip_l.safetensors")
    _fails_without_writing(
        path, ValueError, "not a Stability SD3 checkpoint", monkeypatch, tmp_path
    )


def test_ambiguous_folder(broken, monkeypatch, tmp_path):
    shutil.copy(
        os.path.join(broken, "sd3.5_medium.safetensors"),
        os.path.join(broken, "sd3.5_medium_copy.safetensors"),
    )
    message = _fails_without_writing(broken, ValueError, "2 SD3", monkeypatch, tmp_path)
    assert "sd3.5_medium_copy.safetensors" in message


class _Bomb:
    """Unpickling this creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_checkpoint_is_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "pickles"
    folder.mkdir()
    path = folder / "sd3_medium.ckpt"
    path.write_bytes(pickle.dumps(_Bomb(str(marker))))
    _fails_without_writing(
        str(path), ValueError, "never unpickle", monkeypatch, tmp_path
    )
    assert not marker.exists()
