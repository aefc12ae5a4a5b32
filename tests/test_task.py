"""Task base class: subclass inference, dtype handling, compile defaults."""

import json

import keras
import numpy as np
import pytest
import toy_models

import keras_diffusion as kd


def test_backbone_and_preprocessor_properties():
    task = toy_models.make_toy_task()
    assert isinstance(task.backbone, toy_models.ToyBackbone)
    assert isinstance(task.preprocessor, toy_models.ToyPreprocessor)
    assert len(task.weights) == len(task.backbone.weights) > 0


@pytest.mark.parametrize("base", [kd.models.Task, kd.models.ImageToImage])
def test_from_preset_on_base_class_infers_subclass(tmp_path, base):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    assert type(base.from_preset(str(tmp_path / "p"))) is toy_models.ToyImageToImage


def test_subclass_inferred_from_backbone_without_task_json(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    (tmp_path / "p" / "task.json").unlink()
    task = kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    assert type(task) is toy_models.ToyImageToImage


def test_task_kwargs_override_saved_task_config(tmp_path):
    task = toy_models.make_toy_task()
    task.sampling = {"num_steps": 3}
    task.save_to_preset(tmp_path / "p")
    assert kd.models.ImageToImage.from_preset(str(tmp_path / "p")).sampling == {
        "num_steps": 3
    }
    loaded = kd.models.ImageToImage.from_preset(
        str(tmp_path / "p"), sampling={"num_steps": 9}
    )
    assert loaded.sampling == {"num_steps": 9}


def test_dtype_override_and_saved_dtype_kept(tmp_path):
    task = toy_models.make_toy_task(dtype="bfloat16")
    task.save_to_preset(tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    assert "bfloat16" in json.dumps(saved["config"]["dtype"])

    kept = kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    assert kept.backbone.dtype_policy.name == "bfloat16"
    assert all(v.dtype == "bfloat16" for v in kept.backbone.weights)

    override = kd.models.ImageToImage.from_preset(str(tmp_path / "p"), dtype="float16")
    assert override.backbone.dtype_policy.name == "float16"
    assert all(v.dtype == "float16" for v in override.backbone.weights)
    a = keras.ops.convert_to_numpy(kept.backbone.weights[0]).astype(np.float32)
    b = keras.ops.convert_to_numpy(override.backbone.weights[0]).astype(np.float32)
    np.testing.assert_allclose(a, b, atol=1e-2)

    backbone = kd.models.Backbone.from_preset(str(tmp_path / "p"), dtype="float32")
    assert all(v.dtype == "float32" for v in backbone.weights)


def test_unknown_from_preset_kwarg(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    with pytest.raises(TypeError, match="accepted: preset, load_weights, dtype"):
        kd.models.Backbone.from_preset(str(tmp_path / "p"), dtpe="float16")
    with pytest.raises(TypeError, match="ToyImageToImage"):
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"), colour="red")


def test_preset_of_other_task_type_is_refused(tmp_path):
    @kd.api_export.register
    class OtherTask(kd.models.Task):
        backbone_cls = toy_models.ToyBackbone

    OtherTask(toy_models.ToyBackbone()).save_to_preset(tmp_path / "p")
    with pytest.raises(ValueError, match="not a ImageToImage"):
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"))


def test_compile_defaults():
    task = toy_models.make_toy_task()
    task.compile()
    opt = task.optimizer
    assert isinstance(opt, keras.optimizers.AdamW)
    assert float(keras.ops.convert_to_numpy(opt.learning_rate)) == pytest.approx(1e-4)
    assert opt.weight_decay == pytest.approx(1e-2)
    assert opt.epsilon == pytest.approx(1e-8)
    assert opt.clipnorm == pytest.approx(1.0)
    assert isinstance(task.loss, keras.losses.MeanSquaredError)


def test_compile_overrides():
    task = toy_models.make_toy_task()
    task.compile(optimizer="sgd", loss="mae", metrics=[])
    assert isinstance(task.optimizer, keras.optimizers.SGD)
    assert task.loss == "mae"


def test_presets_mapping_lists_catalogue():
    names = set(kd.models.ImageToImage.presets)
    assert {"stable_diffusion_3_medium", "stable_diffusion_3.5_large_turbo"} <= names
    assert set(kd.models.Backbone.presets) >= names - {"sd3_tiny_demo"}


def test_get_config_round_trip():
    task = toy_models.make_toy_task()
    task.sampling = {"strength": 0.5}
    clone = toy_models.ToyImageToImage.from_config(task.get_config())
    assert clone.sampling == {"strength": 0.5}
    assert clone.backbone.get_config() == task.backbone.get_config()
    assert clone.preprocessor.get_config() == task.preprocessor.get_config()


def test_builtin_names_carry_catalogue_sampling_defaults():
    from keras_diffusion.models.task import _builtin_sampling

    turbo = _builtin_sampling("stable_diffusion_3.5_large_turbo")
    assert turbo["num_steps"] == 4 and turbo["guidance_scale"] <= 1.0
    assert _builtin_sampling("./some/folder") == {}
    demo = kd.models.ImageToImage.from_preset("sd3_tiny_demo")
    expected = _builtin_sampling("sd3_tiny_demo")
    assert demo.sampling["num_steps"] == expected["num_steps"]
    assert (demo.sampling["height"], demo.sampling["width"]) == (64, 64)
