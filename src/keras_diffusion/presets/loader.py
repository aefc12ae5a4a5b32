"""Open any preset handle as a PresetFolder-like object.

`open_preset(handle)` resolves the handle to a local path, then picks the
first registered format whose `detect(path)` accepts it. The native
keras_diffusion format is always last; converters for foreign formats
(diffusers folders, keras-hub presets, single-file checkpoints) register
themselves ahead of it with `register_format`.
"""

import os

from keras_diffusion.presets import handles, hf_conversion
from keras_diffusion.presets.preset_io import CONFIG_FILE, PresetFolder, is_preset

_FORMATS = []


def register_format(name, detect, opener):
    """Register a foreign format: `opener(path, handle)` -> PresetFolder-like."""
    _FORMATS.insert(0, (name, detect, opener))


def _is_native(path):
    return os.path.isdir(path) and (
        is_preset(path) or os.path.isfile(os.path.join(path, CONFIG_FILE))
    )


def open_preset(preset):
    path = handles.resolve(preset)
    for _, detect, opener in _FORMATS:
        if detect(path):
            return opener(path, preset)
    if _is_native(path):
        if hf_conversion.is_converted_preset(path):
            return hf_conversion.open_converted(path, handle=preset)
        return PresetFolder(path, handle=preset)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Preset {preset!r} resolved to {path!r}, which is missing."
        )
    raise FileNotFoundError(
        f"Preset {preset!r} (at {path}) is missing the file {CONFIG_FILE!r}: it is "
        "neither a keras_diffusion preset nor a recognised checkpoint format."
    )
