"""Registration of public classes.

Every class that can appear in a saved config is registered under the
``keras_diffusion`` package, so that configs name it as
``keras_diffusion>ClassName`` and loading can refuse anything else.
"""

import keras

PACKAGE = "keras_diffusion"


def register(cls):
    """Class decorator: make `cls` serializable as `keras_diffusion>Name`."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)
