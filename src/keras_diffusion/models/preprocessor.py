"""Base class for preprocessors: raw inputs in, model-ready arrays out."""

import os

from keras_diffusion.api_export import register
from keras_diffusion.models.tokenizer import Tokenizer
from keras_diffusion.presets import serialization
from keras_diffusion.presets.loader import open_preset
from keras_diffusion.presets.preset_io import save_preset
from keras_diffusion.utils.python_utils import classproperty


@register
class Preprocessor:
    """Holds the tokenizers a model needs and turns prompts into token ids.

    Subclasses list the attributes that hold tokenizers in `tokenizer_names`;
    the base class serializes them into its config and keeps their files
    under `assets/<attribute>/` of a preset. A tokenizer may be None (for
    example an absent T5).

    Examples:
    ```python
    preprocessor = keras_diffusion.models.Preprocessor.from_preset("sd3_tiny_demo")
    token_ids = preprocessor.generate_preprocess(["a red circle"])
    ```
    """

    tokenizer_names = ()

    def get_config(self):
        return {
            name: (
                None
                if getattr(self, name) is None
                else serialization.serialize(getattr(self, name))
            )
            for name in self.tokenizer_names
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in cls.tokenizer_names:
            if isinstance(config.get(name), dict):
                config[name] = serialization.deserialize(
                    config[name], Tokenizer, source=f"preprocessor.{name}"
                )
        return cls(**config)

    def tokenizers(self):
        return {n: getattr(self, n) for n in self.tokenizer_names if getattr(self, n)}

    def save_assets(self, assets_dir):
        for name, tokenizer in self.tokenizers().items():
            folder = os.path.join(assets_dir, name)
            os.makedirs(folder, exist_ok=True)
            tokenizer.save_assets(folder)

    def load_assets(self, assets_dir, preset="preset"):
        for name, tokenizer in self.tokenizers().items():
            folder = os.path.join(assets_dir, name)
            missing = tokenizer.missing_assets(folder)
            if missing:
                raise FileNotFoundError(
                    f"Preset {preset!r} is missing tokenizer file(s) "
                    f"{', '.join('assets/' + name + '/' + m for m in missing)}."
                )
            tokenizer.load_assets(folder)

    @classproperty
    def presets(cls):
        from keras_diffusion.presets import catalogue

        return catalogue.entries_for(None)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Load the preprocessor (and its tokenizer files) from a preset."""
        return open_preset(preset).load_preprocessor(cls, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save the preprocessor config and tokenizer assets, atomically."""
        save_preset(preset_dir, preprocessor=self)
