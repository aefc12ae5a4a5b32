"""Stable Diffusion 3 / 3.5: components, backbone, preprocessor and task."""

from keras_diffusion.converters import diffusers_folder, keras_hub_preset

# A folder with `model_index.json` loads through `from_preset` as SD3, and so
# does a keras-hub SD3 preset folder.
diffusers_folder.register()
keras_hub_preset.register()
