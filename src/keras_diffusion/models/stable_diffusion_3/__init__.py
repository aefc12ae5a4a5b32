"""Stable Diffusion 3 / 3.5: components, backbone, preprocessor and task."""

from keras_diffusion.converters import (
    diffusers_folder,
    keras_hub_preset,
    stability_single_file,
)

# A folder with `model_index.json` loads through `from_preset` as SD3, and so
# does a keras-hub SD3 preset folder and a Stability single-file checkpoint
# (or a folder holding one). Formats registered later are tried first: the
# single-file format, registered first, only sees what the others decline.
stability_single_file.register()
diffusers_folder.register()
keras_hub_preset.register()
