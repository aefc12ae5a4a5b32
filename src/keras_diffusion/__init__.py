"""keras-diffusion: Keras 3-native diffusion tasks (Stable Diffusion 3 / 3.5)."""

from keras_diffusion import models
from keras_diffusion.version import __version__

__all__ = ["models", "__version__"]
