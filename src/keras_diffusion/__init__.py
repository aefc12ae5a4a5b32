"""keras-diffusion: Keras 3-native diffusion tasks (Stable Diffusion 3 / 3.5)."""

from keras_diffusion.utils.optional_jax import declined_optional_jax

# Keras is first imported here; see `optional_jax` for what this declines.
with declined_optional_jax():
    from keras_diffusion import models
from keras_diffusion.version import __version__

__all__ = ["models", "__version__"]
