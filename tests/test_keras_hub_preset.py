"""keras-hub SD3 presets (`kaggle://` handles) load into our classes.

`tests/fixtures/keras_hub_sd3_tiny/` is a tiny random keras-hub
`StableDiffusion3Backbone` preset (SD3.5 flavour: RMS q/k norm, an MMDiT-X
dual-attention block; CLIP-L and CLIP-G, no T5), saved by keras-hub 0.32's
`save_to_preset`; `keras_hub_sd3_tiny_reference.npz` holds inputs and
keras-hub's `generate` output for them (posterior in "mode", the initial
noise injected). Both come from `tools/make_keras_hub_fixture.py`; keras-hub
itself is not needed here.

Residual differences are keras-hub's documented deviations: its CLIP final
layer norm uses epsilon 1e-6 (ours 1e-5, as transformers), and it computes the
sigma schedule in float32 (ours in float64, as diffusers). With both aligned
the outputs agree to float32 rounding. Its img2img start step,
`int(N * (1 - strength))`, can differ by one from diffusers'
`int(N - N * strength)`; the reference uses N=8, strength=0.75, where both
give 2.
"""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from hub_fixtures import fill_kaggle_cache

from keras_diffusion.converters import keras_hub_preset
from keras_diffusion.converters.keras_hub_weights import KerasWeights
from keras_diffusion.models import (
    ImageToImage,
    Preprocessor,
    StableDiffusion3Backbone,
    StableDiffusion3ImageToImage,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PRESET = os.path.join(FIXTURES, "keras_hub_sd3_tiny")
REFERENCE = os.path.join(FIXTURES, "keras_hub_sd3_tiny_reference.npz")
HANDLE = "keras/stablediffusion-3.5/keras/sd35_tiny_fixture/1"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


@pytest.fixture(scope="module")
def task():
    fill_kaggle_cache(HANDLE, PRESET)
    return ImageToImage.from_preset(f"kaggle://{HANDLE}")


def _keras_hub_sigmas(num_steps, shift=3.0):
    """keras-hub's schedule: diffusers' arithmetic, all in float32."""

    def shifted(t):
        s = t / np.float32(1000)
        return np.float32(shift) * s / (np.float32(1) + np.float32(shift - 1) * s)

    train = shifted(np.linspace(1000, 1, 1000, dtype="float32"))
    t = np.linspace(train[0] * 1000, train[-1] * 1000, num_steps, dtype="float32")
    return np.concatenate([shifted(t), np.zeros(1, "float32")]).astype("float32")


def _generate(task, reference):
    """uint8 and float outputs of our generate on the reference's inputs."""
    floats = []
    decode = task.decode
    task.decode = lambda latents: floats.append(decode(latents)) or floats[-1]
    try:
        images = task.generate(
            {
                "images": reference["images"],
                "prompts": [str(p) for p in reference["prompts"]],
                "negative_prompts": [str(p) for p in reference["negative_prompts"]],
            },
            num_steps=int(reference["num_steps"]),
            strength=float(reference["strength"]),
            guidance_scale=float(reference["guidance_scale"]),
            noise=reference["noise"],
            # keras-hub's posterior "mode" is the mean: zero posterior noise.
            posterior_noise=np.zeros_like(reference["noise"]),
        )
    finally:
        del task.decode
    return images, np.asarray(floats[0])


def test_kaggle_handle_generate_matches_keras_hub(task, reference):
    assert type(task) is StableDiffusion3ImageToImage
    ids = task.preprocessor.generate_preprocess([str(p) for p in reference["prompts"]])
    np.testing.assert_array_equal(ids["clip_l"], reference["clip_l_ids"])
    np.testing.assert_array_equal(ids["clip_g"], reference["clip_g_ids"])

    images, floats = _generate(task, reference)
    diff = np.abs(images.astype(int) - reference["generated"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert np.abs(floats - reference["generated_float"]).max() < 1e-4  # ~3e-5

    # Align keras-hub's two deviations; only float32 rounding remains.
    for encoder in (task.backbone.clip_l, task.backbone.clip_g):
        encoder.final_layer_norm.epsilon = 1e-6
    task._compiled = {k: v for k, v in task._compiled.items() if k[0] != "encode_text"}
    schedule = task.schedule
    task.schedule = lambda n, s: (_keras_hub_sigmas(n), schedule(n, s)[1])
    try:
        images, floats = _generate(task, reference)
    finally:
        del task.schedule
    assert np.abs(floats - reference["generated_float"]).max() < 2e-5  # ~6e-6
    assert np.abs(images.astype(int) - reference["generated"]).max() <= 1


def test_config_mapping(task):
    with open(os.path.join(PRESET, "config.json")) as f:
        kwargs = keras_hub_preset.backbone_kwargs(json.load(f))
    assert kwargs["t5"] is None and kwargs["t5_sequence_length"] == 77
    assert kwargs["mmdit"]["context_dim"] == 4096
    assert kwargs["mmdit"]["pooled_dim"] == 32 + 48
    assert kwargs["mmdit"]["dual_attention_layers"] == (0,)
    assert kwargs["clip_l"]["hidden_state_index"] == 1  # keras-hub's index 0
    assert kwargs["vae"]["decoder_layers_per_block"] == 2
    assert (task.backbone.height, task.backbone.width) == (64, 64)


def _copy(tmp_path, name="preset"):
    folder = tmp_path / name
    shutil.copytree(PRESET, folder)
    return folder


def test_t5_and_unmirrored_vae_are_refused(tmp_path):
    with open(os.path.join(PRESET, "config.json")) as f:
        config = json.load(f)
    with_t5 = json.loads(json.dumps(config))
    with_t5["config"]["t5"] = {"class_name": "T5Encoder", "config": {}}
    with pytest.raises(ValueError, match="T5"):
        keras_hub_preset.backbone_kwargs(with_t5)
    vae = json.loads(json.dumps(config))
    vae["config"]["vae"]["config"]["decoder_num_filters"] = [64, 32, 32, 32]
    with pytest.raises(ValueError, match="mirror"):
        keras_hub_preset.backbone_kwargs(vae)


def test_detection(tmp_path):
    assert keras_hub_preset.is_keras_hub_preset(PRESET)
    assert not keras_hub_preset.is_keras_hub_preset(tmp_path)
    (tmp_path / "config.json").write_text('{"registered_name": "keras_hub>Other"}')
    assert not keras_hub_preset.is_keras_hub_preset(tmp_path)


def _reshard(folder, shards=3):
    """Split model.weights.h5 the way Keras' sharded saving lays it out."""
    source = folder / "model.weights.h5"
    groups = []
    with h5py.File(source, "r") as f:
        f.visititems(
            lambda name, obj: (
                groups.append(name)
                if isinstance(obj, h5py.Group) and name.endswith("/vars")
                else None
            )
        )
        weight_map = {}
        files = [
            h5py.File(folder / f"model_{i:05}.weights.h5", "w") for i in range(shards)
        ]
        for i, group in enumerate(groups):
            target = files[i % shards]
            target.require_group(group)
            for key in f[group]:
                target[group].create_dataset(key, data=f[group][key][()])
            weight_map[f"/{group}"] = os.path.basename(target.filename)
        for handle in files:
            handle.close()
    source.unlink()
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.weights.json").write_text(json.dumps(index))


def test_sharded_weights_load_the_same(task, tmp_path):
    folder = _copy(tmp_path)
    _reshard(folder)
    sharded = StableDiffusion3Backbone.from_preset(str(folder))
    for a, b in zip(task.backbone.weights, sharded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))


def test_unused_weight_is_an_error(tmp_path):
    folder = _copy(tmp_path)
    with h5py.File(folder / "model.weights.h5", "a") as f:
        f.create_dataset("layers/mystery_layer/vars/0", data=np.zeros(3, "float32"))
    with pytest.raises(ValueError, match="mystery_layer"):
        StableDiffusion3Backbone.from_preset(str(folder))


def test_links_and_missing_weights_are_refused(tmp_path):
    folder = _copy(tmp_path)
    path = folder / "model.weights.h5"
    with h5py.File(path, "a") as f:
        f["layers/alias"] = h5py.SoftLink("/layers/mm_di_t")
    with pytest.raises(ValueError, match="link"):
        KerasWeights(path)
    with h5py.File(path, "a") as f:
        del f["layers/alias"]
    weights = KerasWeights(path)
    with pytest.raises(KeyError, match="layers/nothing/vars/0"):
        weights.shape("layers/nothing/vars/0")


def test_preprocessor_without_task_json(reference, tmp_path):
    folder = _copy(tmp_path)
    (folder / "task.json").unlink()
    preprocessor = Preprocessor.from_preset(str(folder))
    ids = preprocessor.generate_preprocess([str(p) for p in reference["prompts"]])
    np.testing.assert_array_equal(ids["clip_l"], reference["clip_l_ids"])
    np.testing.assert_array_equal(ids["clip_g"], reference["clip_g_ids"])


def test_documented_start_step_deviation():
    """keras-hub starts img2img at int(N * (1 - strength)); diffusers and we at
    int(N - N * strength). They agree for the reference, not everywhere."""
    from keras_diffusion.samplers import flow_match

    assert flow_match.start_index(8, 0.75) == int(8 * (1 - 0.75)) == 2
    assert flow_match.start_index(5, 0.8) == 1 and int(5 * (1 - 0.8)) == 0
