"""Base class for backbones: the model's layers, without task logic."""

import keras

from keras_diffusion.api_export import register
from keras_diffusion.presets import catalogue
from keras_diffusion.presets.loader import open_preset
from keras_diffusion.presets.preset_io import save_preset
from keras_diffusion.utils.python_utils import classproperty


@register
class Backbone(keras.Model):
    """A `keras.Model` holding a diffusion model's components.

    Subclasses create and build all their sublayers in `__init__` and end it
    with `self.built = True`, so a freshly constructed backbone has its weights
    and can load a preset's weights.
    `get_config` carries `name`, `trainable` and the dtype policy; subclasses
    add their own architecture arguments.

    Examples:
    ```python
    backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
    backbone.save_to_preset("./my_preset")
    ```
    """

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        dtype = config.get("dtype")
        if isinstance(dtype, dict):
            config["dtype"] = keras.dtype_policies.deserialize(dtype)
        return cls(**config)

    @classproperty
    def presets(cls):
        """The built-in presets this class can load, as `{name: entry}`."""
        return catalogue.entries_for(_registered_names(cls))

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build a backbone from a preset handle.

        Args:
            preset: a built-in name, a `kaggle://` or `hf://` handle, or a local
                preset folder.
            load_weights: load the saved weights (else random initialisation).
            **kwargs: `dtype` overrides the saved dtype policy.
        """
        unknown = set(kwargs) - {"dtype"}
        if unknown:
            raise TypeError(
                f"Unknown argument(s) {sorted(unknown)} for {cls.__name__}.from_preset;"
                " accepted: preset, load_weights, dtype."
            )
        return open_preset(preset).load_backbone(cls, load_weights, kwargs.get("dtype"))

    def save_to_preset(self, preset_dir):
        """Save config, weights and metadata to `preset_dir`, atomically."""
        save_preset(preset_dir, backbone=self)


def _registered_names(cls):
    names = set()
    for klass in [cls, *_all_subclasses(cls)]:
        names.add(f"keras_diffusion>{klass.__name__}")
    return names


def _all_subclasses(cls):
    result = []
    for sub in cls.__subclasses__():
        result.append(sub)
        result.extend(_all_subclasses(sub))
    return result
