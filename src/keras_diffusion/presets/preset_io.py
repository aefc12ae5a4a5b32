"""Reading and writing keras_diffusion presets.

A preset is a folder:

    config.json          the backbone, `registered_name` `keras_diffusion>...`
    task.json            the task's own config (no backbone/preprocessor inside)
    preprocessor.json    the preprocessor, tokenizers nested in its config
    metadata.json        versions, parameter count, date
    model.safetensors    backbone weights, by variable path (or, above 4 GB,
                         model.safetensors.index.json + shards; `weights_io`)
    assets/<name>/...    tokenizer files, one folder per preprocessor tokenizer

Saving is atomic: everything is written to a temporary sibling folder, which
then replaces the target with renames. Loading only instantiates registered
classes (see `serialization`) and reads only safetensors and JSON, except
that presets from before the safetensors format (`model.weights.h5`, or
`model.weights.json` + shards: Keras' format, which holds no code either)
still load through Keras' weight loader.
"""

import datetime
import json
import os
import shutil
import tempfile

import keras
import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy)
import numpy as np

from keras_diffusion.presets import serialization, weights_io
from keras_diffusion.utils.python_utils import read_json
from keras_diffusion.utils.weight_loading import loading_weights
from keras_diffusion.version import __version__

CONFIG_FILE = "config.json"
TASK_FILE = "task.json"
PREPROCESSOR_FILE = "preprocessor.json"
METADATA_FILE = "metadata.json"
ASSETS_DIR = "assets"
# Keras' weight files, which presets from before the safetensors format hold.
LEGACY_WEIGHTS_FILE = "model.weights.h5"
LEGACY_SHARDED_WEIGHTS_FILE = "model.weights.json"


def is_preset(path):
    """Every preset this library writes has a metadata.json."""
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def cache_saving_skipsets():
    """Fill the cache Keras' weight saving walk misses, so it is built once.

    For every object it visits, Keras 3's saving walk asks for the set of
    attribute names to skip for the object's kind ("Layer", ...). It builds
    that set from a fresh reference object (a `Layer()` and its `dir()`) and
    caches it under `saving_attr_skipset_<kind>`, but looks it up under
    `saving_attr_skiplist_<kind>`, so it builds it again for each of a
    backbone's ~240 layers: 0.2-0.4 s of loading the bench backbone (ad hoc
    timing). Storing each set under the key the lookup uses makes the cache
    hit; the sets are Keras' own, so the walk visits the same attributes.
    `Backbone.save_weights` and `load_weights` (presets included) call it.
    """
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    for kind in ("Layer", "Functional", "Sequential", "Operation"):
        lookup = f"saving_attr_skiplist_{kind}"
        if global_state.get_global_attribute(lookup) is None:
            skipset = saving_lib.get_attr_skipset(kind)
            global_state.set_global_attribute(lookup, skipset)


def _parameter_count(model):
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def save_preset(preset_dir, backbone=None, preprocessor=None, task=None):
    """Write a preset folder atomically.

    `backbone` (with weights), `preprocessor` (with assets) and `task` (its own
    config) are each optional, but at least one must be given. A target that
    exists must be an earlier preset or an empty folder.
    """
    preset_dir = os.path.abspath(os.fspath(preset_dir))
    if os.path.exists(preset_dir):
        if not os.path.isdir(preset_dir):
            raise ValueError(f"Cannot save a preset to {preset_dir!r}: it is a file.")
        if os.listdir(preset_dir) and not is_preset(preset_dir):
            raise ValueError(
                f"Refusing to save a preset into {preset_dir!r}: the folder is not "
                "empty and does not hold a keras_diffusion preset."
            )
    parent = os.path.dirname(preset_dir)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(preset_dir)
    staging = tempfile.mkdtemp(prefix=f".{base}.saving-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private (0700)
    try:
        _write_preset_files(staging, backbone, preprocessor, task)
        _replace_folder(staging, preset_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_preset_files(folder, backbone, preprocessor, task):
    metadata = {
        "keras_version": keras.__version__,
        "keras_diffusion_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    if backbone is not None:
        _write_json(
            os.path.join(folder, CONFIG_FILE), serialization.serialize(backbone)
        )
        metadata["parameter_count"] = _parameter_count(backbone)
        metadata["backbone"] = serialization.serialize(backbone)["registered_name"]
        weights_io.save_weights(backbone, folder)
    if preprocessor is not None:
        _write_json(
            os.path.join(folder, PREPROCESSOR_FILE),
            serialization.serialize(preprocessor),
        )
        preprocessor.save_assets(os.path.join(folder, ASSETS_DIR))
    if task is not None:
        _write_json(os.path.join(folder, TASK_FILE), task.serialize_task_config())
    _write_json(os.path.join(folder, METADATA_FILE), metadata)


def _replace_folder(staging, target):
    """Move `staging` to `target`; an existing `target` survives any failure."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    parent, base = os.path.split(target)
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


class PresetFolder:
    """A local keras_diffusion preset folder, read lazily and checked."""

    def __init__(self, path, handle=None):
        self.path = os.fspath(path)
        self.handle = handle or self.path
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"Preset folder {self.path!r} does not exist.")

    def file(self, name):
        path = os.path.join(self.path, name)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Preset {self.handle!r} is missing the file {name!r} "
                f"(looked in {self.path})."
            )
        return path

    def has(self, name):
        return os.path.exists(os.path.join(self.path, name))

    def json(self, name):
        corrupt = f"Preset {self.handle!r} has a corrupt {name!r}"
        return read_json(self.file(name), corrupt)

    def backbone_class(self, expected_base):
        config = self.json(CONFIG_FILE)
        return serialization.registered_class(
            config.get("registered_name"), expected_base, f"{self.handle}/{CONFIG_FILE}"
        )

    def load_backbone(self, expected_base, load_weights=True, dtype=None):
        overrides = {} if dtype is None else {"dtype": dtype}

        def build():
            return serialization.deserialize(
                self.json(CONFIG_FILE),
                expected_base,
                source=f"{self.handle}/{CONFIG_FILE}",
                **overrides,
            )

        if not load_weights:
            return build()
        with loading_weights() as build_for_loading:
            backbone = build_for_loading(build)
            self.load_weights(backbone)
        return backbone

    def load_weights(self, backbone):
        legacy = [
            name
            for name in (LEGACY_SHARDED_WEIGHTS_FILE, LEGACY_WEIGHTS_FILE)
            if self.has(name)
        ]
        if weights_io.has_weights(self.path) or not legacy:
            name = weights_io.WEIGHTS_FILE
            if self.has(weights_io.INDEX_FILE):
                name = weights_io.INDEX_FILE
            self.file(name)  # names the missing file

            def load():
                weights_io.load_weights(backbone, self.path)

        else:
            name = legacy[0]

            def load():
                backbone.load_weights(self.file(name))

        try:
            load()
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"Could not load weights from {name!r} of preset {self.handle!r}: {e}"
            ) from e

    def load_preprocessor(self, expected_base, **overrides):
        preprocessor = serialization.deserialize(
            self.json(PREPROCESSOR_FILE),
            expected_base,
            source=f"{self.handle}/{PREPROCESSOR_FILE}",
            **overrides,
        )
        preprocessor.load_assets(os.path.join(self.path, ASSETS_DIR), self.handle)
        return preprocessor

    def task_config(self):
        return self.json(TASK_FILE) if self.has(TASK_FILE) else None
