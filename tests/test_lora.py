"""LoRA on the SD3 backbone: training, save / load, presets, merging, counts.

One module-scoped run enables rank-4 adapters on the demo preset and fits
them for a few steps on cached inputs (one compiled train step per
backend); the round-trip tests compare MMDiT outputs on fixed inputs.
"""

import doctest
import json

import keras
import numpy as np
import pytest
from keras import ops
from safetensors.numpy import save_file

import keras_diffusion as kd
from keras_diffusion.models import lora
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.mmdit_lora import (
    lora_parameters,
    mmdit_dense_layers,
)
from keras_diffusion.presets import weights_io

RANK = 4
STEPS = 6
SD3_MEDIUM_MMDIT = {
    "hidden_dim": 1536,
    "num_layers": 24,
    "num_heads": 24,
    "position_size": 192,
}


def _snapshot(variables):
    return {v.path: np.array(ops.convert_to_numpy(v)) for v in variables}


def _velocity(backbone):
    """The MMDiT's output on fixed inputs, eagerly (shared by every model)."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 16)).astype("float32")
    context = rng.standard_normal((2, 93, 64)).astype("float32")
    pooled = rng.standard_normal((2, 64)).astype("float32")
    timestep = np.array([250.0, 900.0], "float32")
    return ops.convert_to_numpy(backbone.mmdit(latents, context, pooled, timestep))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    task = kd.models.ImageToImage.from_preset(
        "sd3_tiny_demo", seed=2, prompt_dropout=0.0
    )
    backbone = task.backbone
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), np.uint8)
    cache = task.precompute({"images": images, "prompts": ["a red circle", "blue"]})
    base = _snapshot(backbone.weights)
    base_velocity = _velocity(backbone)
    backbone.enable_lora(RANK)
    task.compile(optimizer=keras.optimizers.AdamW(1e-2, clipnorm=1.0))
    history = task.fit(cache, batch_size=2, epochs=STEPS, verbose=0).history
    folder = tmp_path_factory.mktemp("lora")
    adapter = str(folder / "adapter.safetensors")
    backbone.save_lora_weights(adapter)
    print("LoRA fit loss per step:", np.round(history["loss"], 3).tolist())
    return {
        "task": task,
        "base": base,
        "base_velocity": base_velocity,
        "trained": _snapshot(backbone.weights),
        "velocity": _velocity(backbone),
        "adapter": adapter,
        "folder": folder,
        "history": history["loss"],
    }


def _lora_targets(run):
    return len(run["task"].backbone.lora_config["target_layers"])


def test_default_targets_are_the_attention_projections(run):
    backbone = run["task"].backbone
    targets = backbone.lora_config["target_layers"]
    blocks, width = backbone.mmdit.num_layers, backbone.mmdit.hidden_dim
    # blocks x (x_qkv, context_qkv, x_attention_output) + (blocks - 1) text
    # outputs (the last block is context-pre-only).
    assert len(targets) == 4 * blocks - 1
    assert f"mmdit/block_{blocks - 1}/context_attention_output" not in targets
    assert {t.rsplit("/", 1)[1] for t in targets} == {
        "x_qkv",
        "context_qkv",
        "x_attention_output",
        "context_attention_output",
    }
    trainable = run["task"].trainable_weights
    assert {v.path.rsplit("/", 1)[1] for v in trainable} == {
        "lora_kernel_a",
        "lora_kernel_b",
    }
    count = sum(int(np.prod(v.shape)) for v in trainable)
    # Fused q/k/v adapters: 4 d r each; attention outputs: 2 d r each.
    expected = (12 * (blocks - 1) + 10) * width * RANK
    assert count == lora_parameters(backbone.get_config(), RANK) == expected


def test_only_lora_weights_train(run):
    base, trained = run["base"], run["trained"]
    assert all(np.array_equal(base[p], trained[p]) for p in base)
    factors = {p: trained[p] for p in trained if p not in base}
    assert len(factors) == 2 * _lora_targets(run)
    assert all(np.any(v != 0) for p, v in factors.items() if p.endswith("_b"))
    assert np.all(np.isfinite(run["history"]))
    change = np.abs(run["velocity"] - run["base_velocity"]).max()
    assert change > 1e-3  # the adapters do something


def test_load_lora_weights_then_merge(run):
    plain = kd.models.Backbone.from_preset("sd3_tiny_demo")
    task = kd.models.StableDiffusion3ImageToImage(plain)
    width = plain.mmdit.hidden_dim
    x = np.random.default_rng(3).standard_normal((2, 5, width)).astype("float32")
    probe = task._function(("probe",), lambda x: plain.mmdit.blocks[0].x_qkv(x))
    before = ops.convert_to_numpy(probe(x))
    plain.load_lora_weights(run["adapter"])
    assert plain.lora_config == run["task"].backbone.lora_config
    np.testing.assert_allclose(_velocity(plain), run["velocity"], atol=1e-5)
    # Compiled functions are dropped when the variables change.
    probe = task._function(("probe",), lambda x: plain.mmdit.blocks[0].x_qkv(x))
    eager = ops.convert_to_numpy(plain.mmdit.blocks[0].x_qkv(x))
    np.testing.assert_allclose(ops.convert_to_numpy(probe(x)), eager, atol=1e-5)
    assert np.abs(eager - before).max() > 1e-4

    count = len(plain.weights)
    plain.merge_lora()
    np.testing.assert_allclose(_velocity(plain), run["velocity"], atol=1e-4)
    assert plain.lora_config is None and "lora" not in plain.get_config()
    assert len(plain.weights) == count - 2 * _lora_targets(run) == len(run["base"])
    assert not lora.lora_layer_paths(plain)
    layer = plain.mmdit.blocks[0].x_qkv
    assert (
        type(layer) is keras.layers.Dense
        and layer.get_config().get("lora_rank") is None
    )
    # The task's freezing is back: the MMDiT trains again, the encoders do not.
    trainable = {v.path.split("/")[0] for v in task.trainable_weights}
    assert trainable == {"mmdit"}


def test_preset_round_trip(run):
    path = str(run["folder"] / "preset")
    run["task"].save_to_preset(path)
    loaded = kd.models.ImageToImage.from_preset(path)
    backbone = loaded.backbone
    assert backbone.lora_config == run["task"].backbone.lora_config
    weights = _snapshot(backbone.weights)
    assert weights.keys() == run["trained"].keys()
    for p, value in run["trained"].items():
        np.testing.assert_array_equal(weights[p], value, err_msg=p)
    np.testing.assert_allclose(_velocity(backbone), run["velocity"], atol=1e-6)
    paths = {v.path for v in loaded.trainable_weights}
    assert paths == {v.path for v in lora.lora_variables(backbone)}
    # The adapters' weights are not loadable into a model without adapters.
    plain = kd.models.Backbone.from_preset("sd3_tiny_demo")
    with pytest.raises(ValueError, match="tensors are unknown to it"):
        weights_io.load_weights(plain, path)


def test_lora_errors(run, tmp_path):
    backbone = run["task"].backbone
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(2)
    with pytest.raises(ValueError, match="matches no Dense layer"):
        lora.resolve_targets(backbone, ["mmdit/block_*/nothing"])
    with pytest.raises(ValueError, match="safetensors"):
        backbone.save_lora_weights(str(tmp_path / "adapter.h5"))
    config, tensors = lora.read_factors(run["adapter"])
    config["rank"] = 2
    bad = str(tmp_path / "rank2.safetensors")
    metadata = {"format": lora.LORA_FORMAT, "config": json.dumps(config)}
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(ValueError, match="holds LoRA"):
        backbone.load_lora_weights(bad)
    save_file(tensors, bad)
    with pytest.raises(ValueError, match="not a keras_diffusion LoRA file"):
        backbone.load_lora_weights(bad)


def test_parameter_count_for_sd3_medium():
    count = lora_parameters({"mmdit": SD3_MEDIUM_MMDIT}, rank=4)
    assert count == 1_757_184 == 286 * 1536 * 4
    assert lora_parameters({"mmdit": SD3_MEDIUM_MMDIT}, rank=16) == 7_028_736
    qkv_only = lora_parameters(
        {"mmdit": SD3_MEDIUM_MMDIT}, rank=1, target_layers="mmdit/block_*/x_qkv"
    )
    assert qkv_only == 24 * (1536 + 3 * 1536)
    with pytest.raises(ValueError, match="MMDiT only"):
        lora_parameters({"mmdit": SD3_MEDIUM_MMDIT}, 4, ["clip_l/*"])


def test_dense_inventory_matches_built_models(run):
    backbone = run["task"].backbone
    built = {
        p: tuple(layer._kernel.shape)
        for p, layer in lora.dense_layers(backbone).items()
        if p.startswith("mmdit/")
    }
    assert built == mmdit_dense_layers(backbone.get_config()["mmdit"])
    config = dict(
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        position_size=4,
        context_dim=8,
        pooled_dim=8,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    # Unbuilt (cheap): the layer paths and output widths.
    layers = lora.dense_layers(MMDiT(**config))
    expected = mmdit_dense_layers(config, prefix="")
    assert {p: la.units for p, la in layers.items()} == {
        p: units for p, (_, units) in expected.items()
    }


def test_doctests():
    from keras_diffusion.models.stable_diffusion_3 import mmdit_lora

    assert doctest.testmod(mmdit_lora).failed == 0
