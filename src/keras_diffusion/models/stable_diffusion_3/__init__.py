"""Stable Diffusion 3 / 3.5: components, backbone, preprocessor and task."""

from keras_diffusion.converters import diffusers_folder

# A folder with `model_index.json` loads through `from_preset` as SD3.
diffusers_folder.register()
