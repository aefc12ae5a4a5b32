"""Base class for backbones: the model's layers, without task logic."""

import keras

from keras_diffusion.api_export import register
from keras_diffusion.models import lora
from keras_diffusion.presets import catalogue, preset_io
from keras_diffusion.presets.loader import open_preset
from keras_diffusion.presets.preset_io import save_preset
from keras_diffusion.utils.python_utils import classproperty


@register
class Backbone(keras.Model):
    """A `keras.Model` holding a diffusion model's components.

    Subclasses create and build all their sublayers in `__init__` and end it
    with `self.built = True`, so a freshly constructed backbone has its weights
    and can load a preset's weights.
    `get_config` carries `name`, `trainable` and the dtype policy (and the
    LoRA adapters' `rank`, `alpha` and `target_layers` when `enable_lora` ran,
    so `from_config` and `from_preset` rebuild them); subclasses add their own
    architecture arguments. Subclasses name their default LoRA targets in
    `default_lora_targets` (glob patterns over `Dense` layer paths).

    Examples:
    ```python
    backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
    backbone.save_to_preset("./my_preset")
    ```
    """

    default_lora_targets = ()

    def save_weights(self, filepath, *args, **kwargs):
        preset_io.cache_saving_skipsets()  # Keras' walk misses its own cache
        return super().save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath, *args, **kwargs):
        preset_io.cache_saving_skipsets()
        return super().load_weights(filepath, *args, **kwargs)

    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }
        if self.lora_config is not None:
            config["lora"] = dict(self.lora_config)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        dtype = config.get("dtype")
        if isinstance(dtype, dict):
            config["dtype"] = keras.dtype_policies.deserialize(dtype)
        lora_config = config.pop("lora", None)
        backbone = cls(**config)
        if lora_config is not None:
            backbone.enable_lora(**lora_config)
        return backbone

    # ------------------------------------------------------------------- LoRA
    @property
    def lora_config(self):
        """`{"rank", "alpha", "target_layers"}` of the adapters, or None."""
        config = getattr(self, "_lora_config", None)
        if config is None:
            return None
        return {
            "rank": int(config["rank"]),
            "alpha": float(config["alpha"]),
            "target_layers": [str(p) for p in config["target_layers"]],
        }

    def enable_lora(self, rank, target_layers=None, alpha=None):
        """Add LoRA adapters; afterwards only the adapters are trainable.

        Uses Keras' `Dense.enable_lora` (`A` He-uniform, `B` zeros, scale
        `alpha / rank`) on every target. The adapters are saved unmerged by
        `save_weights` and presets (see `keras_diffusion.models.lora`).
        Enable LoRA before `compile()`, so the optimizer sees the adapters.

        Args:
            rank: int, the adapters' rank.
            target_layers: glob patterns or exact paths of `Dense` layers
                under the backbone (e.g. `"mmdit/block_*/x_qkv"`); None
                takes `default_lora_targets`.
            alpha: float scale numerator; None means `rank` (scale 1).

        Examples:
        ```python
        backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
        backbone.enable_lora(4)
        [v.path for v in backbone.trainable_weights][:2]
        # ['mmdit/block_0/x_qkv/lora_kernel_a', 'mmdit/block_0/x_qkv/lora_kernel_b']
        ```
        """
        if self.lora_config is not None:
            raise ValueError("LoRA is already enabled; `merge_lora()` it first.")
        targets = self.default_lora_targets if target_layers is None else target_layers
        self._lora_config = lora.enable(self, rank, targets, alpha)

    def save_lora_weights(self, path):
        """Save only the LoRA factors (and their config) to a `.safetensors` file.

        Examples:
        ```python
        backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
        backbone.enable_lora(4)
        backbone.save_lora_weights("adapter.safetensors")
        ```
        """
        if self.lora_config is None:
            raise ValueError("This backbone has no LoRA adapters to save.")
        lora.save_factors(self, path, self.lora_config)

    def load_lora_weights(self, path):
        """Load LoRA factors from `save_lora_weights`' file.

        A backbone without adapters gets them first, with the file's rank,
        alpha and targets; one with adapters must match the file.

        Examples:
        ```python
        trained = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
        trained.enable_lora(4)
        trained.save_lora_weights("adapter.safetensors")
        backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
        backbone.load_lora_weights("adapter.safetensors")
        ```
        """
        config, tensors = lora.read_factors(path)
        if self.lora_config is None:
            self.enable_lora(**config)
        elif dict(self.lora_config) != config:
            raise ValueError(
                f"{path!r} holds LoRA {config}, but this backbone has "
                f"{dict(self.lora_config)}."
            )
        lora.assign_factors(self, tensors)

    def merge_lora(self):
        """Fold the adapters into their kernels and remove them.

        The backbone then computes what it computed with the adapters (up to
        float rounding), its config has no `lora`, and the other weights get
        back the trainable flags they had before `enable_lora`.

        Examples:
        ```python
        backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
        backbone.enable_lora(4)
        backbone.merge_lora()
        backbone.lora_config  # None
        ```
        """
        if self.lora_config is None:
            raise ValueError("This backbone has no LoRA adapters to merge.")
        lora.merge(self)
        self._lora_config = None

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
