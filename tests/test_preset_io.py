"""Preset format: round-trips, atomic saves, safe loading, clear errors."""

import json
import os

import numpy as np
import pytest
import toy_models

import keras_diffusion as kd
from keras_diffusion.presets import preset_io, weights_io


def _weights(model):
    return [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in model.weights]


def test_task_round_trip_keeps_weights_and_files(tmp_path):
    task = toy_models.make_toy_task()
    task.save_to_preset(tmp_path / "p")
    files = sorted(os.listdir(tmp_path / "p"))
    assert files == [
        "assets",
        "config.json",
        "metadata.json",
        "model.safetensors",
        "preprocessor.json",
        "task.json",
    ]
    assert os.listdir(tmp_path / "p" / "assets" / "tokenizer") == ["words.json"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["registered_name"] == "keras_diffusion>ToyBackbone"
    metadata = json.loads((tmp_path / "p" / "metadata.json").read_text())
    assert metadata["parameter_count"] == task.backbone.count_params()
    assert {"keras_version", "keras_diffusion_version", "date"} <= set(metadata)

    loaded = kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    assert type(loaded) is toy_models.ToyImageToImage
    for a, b in zip(_weights(task.backbone), _weights(loaded.backbone)):
        np.testing.assert_array_equal(a, b)
    assert loaded.preprocessor.tokenizer.words == task.preprocessor.tokenizer.words


def test_saving_walk_builds_each_skipset_once(tmp_path, monkeypatch):
    # Keras builds a kind's skipped-attribute set from a bare reference
    # `Layer()`; with its cache missing, it builds one per layer it visits.
    from keras.src.backend.common import global_state
    from keras.src.layers.layer import Layer

    built = []
    layer_init = Layer.__init__

    def counting_init(self, *args, **kwargs):
        if type(self) is Layer:
            built.append(self)
        layer_init(self, *args, **kwargs)

    def references_built(save_and_load):
        for kind in ("Layer", "Functional", "Sequential", "Operation"):
            for prefix in ("saving_attr_skiplist_", "saving_attr_skipset_"):
                global_state.set_global_attribute(prefix + kind, None)
        built.clear()
        save_and_load()
        return len(built)

    task = toy_models.make_toy_task()
    monkeypatch.setattr(Layer, "__init__", counting_init)

    def weights_round_trip():
        path = str(tmp_path / "direct.weights.h5")
        task.backbone.save_weights(path)
        task.backbone.load_weights(path)

    cached = references_built(weights_round_trip)
    with monkeypatch.context() as m:
        m.setattr(preset_io, "cache_saving_skipsets", lambda: None)
        uncached = references_built(weights_round_trip)
    # One reference per kind that builds a Layer (Layer, Functional,
    # Sequential), for saving and loading together.
    assert cached <= 3, cached
    assert uncached > cached, (uncached, cached)


def test_presets_from_before_safetensors_still_load(tmp_path):
    task = toy_models.make_toy_task()
    task.save_to_preset(tmp_path / "p")
    os.remove(tmp_path / "p" / "model.safetensors")
    task.backbone.save_weights(str(tmp_path / "p" / "model.weights.h5"))
    loaded = kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    for a, b in zip(_weights(task.backbone), _weights(loaded.backbone)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "p" / "model.weights.h5").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not load weights from 'model.weights"):
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"))


def test_load_weights_false_gives_fresh_weights(tmp_path):
    task = toy_models.make_toy_task()
    task.save_to_preset(tmp_path / "p")
    loaded = kd.models.Backbone.from_preset(str(tmp_path / "p"), load_weights=False)
    assert type(loaded) is toy_models.ToyBackbone
    diffs = [
        np.abs(a - b).max()
        for a, b in zip(_weights(task.backbone), _weights(loaded))
        if a.size > 1 and np.abs(a).max() > 0
    ]
    assert diffs and max(diffs) > 0


def test_backbone_and_preprocessor_presets(tmp_path):
    task = toy_models.make_toy_task()
    task.backbone.save_to_preset(tmp_path / "b")
    assert not (tmp_path / "b" / "preprocessor.json").exists()
    backbone = toy_models.ToyBackbone.from_preset(str(tmp_path / "b"))
    assert backbone.hidden_dim == 4
    task.preprocessor.save_to_preset(tmp_path / "pp")
    pre = kd.models.Preprocessor.from_preset(str(tmp_path / "pp"))
    assert type(pre) is toy_models.ToyPreprocessor
    np.testing.assert_array_equal(
        pre.generate_preprocess(["red circle"]), [[2, 4, 0, 0]]
    )


def test_sharded_weights_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_io, "SHARD_THRESHOLD_BYTES", 0)
    monkeypatch.setattr(weights_io, "SHARD_BYTES", 215)
    task = toy_models.make_toy_task()
    task.save_to_preset(tmp_path / "p")
    names = os.listdir(tmp_path / "p")
    assert "model.safetensors.index.json" in names
    assert "model.safetensors" not in names
    assert len([n for n in names if weights_io.SHARD_NAME.match(n)]) > 1
    loaded = kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    for a, b in zip(_weights(task.backbone), _weights(loaded.backbone)):
        np.testing.assert_array_equal(a, b)


def test_atomic_save_keeps_old_preset_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "p"
    old = toy_models.make_toy_task()
    old.save_to_preset(target)
    before = {n: (target / n).read_bytes() for n in os.listdir(target) if n != "assets"}

    new = toy_models.make_toy_task()
    write_file = weights_io._write_file

    def failing_write(path, variables):
        write_file(path, variables)  # the file is complete on disk, then:
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(weights_io, "_write_file", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        new.save_to_preset(target)
    after = {n: (target / n).read_bytes() for n in os.listdir(target) if n != "assets"}
    assert before == after
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no staging folder left behind
    kd.models.ImageToImage.from_preset(str(target))


def test_overwriting_a_preset_replaces_it(tmp_path):
    target = tmp_path / "p"
    toy_models.make_toy_task().save_to_preset(target)
    task = toy_models.make_toy_task()
    task.save_to_preset(target)
    loaded = kd.models.ImageToImage.from_preset(str(target))
    for a, b in zip(_weights(task.backbone), _weights(loaded.backbone)):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_refuses_non_empty_non_preset_folder(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    assert os.listdir(tmp_path / "p") == ["notes.txt"]


def test_missing_file_names_file_and_preset(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    os.remove(tmp_path / "p" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors") as e:
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"))
    assert str(tmp_path / "p") in str(e.value)


def test_missing_tokenizer_asset(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    os.remove(tmp_path / "p" / "assets" / "tokenizer" / "words.json")
    with pytest.raises(FileNotFoundError, match="assets/tokenizer/words.json"):
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"))


def test_corrupt_config_is_a_clear_error(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt 'config.json'"):
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"))


def test_corrupt_weights_is_a_clear_error(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    (tmp_path / "p" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Could not load weights.*safetensors"):
        kd.models.ImageToImage.from_preset(str(tmp_path / "p"))


@pytest.mark.parametrize(
    "registered_name",
    ["os>system", "keras_diffusion>NoSuchBackbone", "builtins>eval", None],
)
def test_unknown_registered_name_is_refused(tmp_path, registered_name):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    config["registered_name"] = registered_name
    config["module"] = "os"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="registered|unknown class"):
        kd.models.Backbone.from_preset(str(tmp_path / "p"))


def test_foreign_module_in_nested_config_is_refused(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    config["config"]["dtype"] = {
        "module": "subprocess",
        "class_name": "Popen",
        "config": {"args": ["true"]},
        "registered_name": None,
    }
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="module 'subprocess'"):
        kd.models.Backbone.from_preset(str(tmp_path / "p"))


def test_wrong_class_kind_is_refused(tmp_path):
    toy_models.make_toy_task().save_to_preset(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    config = json.loads(path.read_text())
    config["registered_name"] = "keras_diffusion>ToyTokenizer"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a Backbone"):
        kd.models.Backbone.from_preset(str(tmp_path / "p"))


def test_no_pickle_in_the_library():
    root = os.path.join(os.path.dirname(kd.__file__))
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert "import pickle" not in text, name
                assert "torch.load" not in text, name
