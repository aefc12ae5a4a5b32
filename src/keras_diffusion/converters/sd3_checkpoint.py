"""What every foreign SD3 checkpoint opener shares: building the backbone.

A diffusers folder, a keras-hub preset and a Stability single file differ in
how they describe the model and where its tensors live, but `from_preset`
asks each the same questions as a `PresetFolder`. The answers that do not
depend on the format live here; a subclass sets `self.handle` and provides
`backbone_config()`, `load_weights(backbone, progress=None)`, `has(name)` and
`load_preprocessor(expected_base=None)`.
"""

from keras_diffusion.utils.weight_loading import loading_weights


class SD3Checkpoint:
    """Base of the openers of SD3 checkpoints in other libraries' formats."""

    handle = None

    def backbone_config(self):
        raise NotImplementedError

    def load_weights(self, backbone, progress=None):
        raise NotImplementedError

    def backbone_class(self, expected_base=None):
        # Imported late: `models/stable_diffusion_3/__init__` imports the
        # converters (to register them), so a top-level import would cycle.
        from keras_diffusion.models.stable_diffusion_3 import (
            stable_diffusion_3_backbone as module,
        )

        return module.StableDiffusion3Backbone

    def load_backbone(
        self, expected_base=None, load_weights=True, dtype=None, progress=None
    ):
        """The backbone the checkpoint describes, with its weights if asked.

        The weights are converted straight into the built model; an error
        leaves no half-loaded model behind (`loading_weights`).
        """
        cls = self.backbone_class()
        if expected_base is not None and not issubclass(cls, expected_base):
            raise ValueError(
                f"{self.handle} holds an SD3 model, not a {expected_base.__name__}."
            )
        config = self.backbone_config()
        if not load_weights:
            return cls(**config, dtype=dtype)
        with loading_weights() as build:
            backbone = build(lambda: cls(**config, dtype=dtype))
            self.load_weights(backbone, progress)
        return backbone

    def task_config(self):
        """Foreign formats carry no task: an SD3 img2img task, its defaults."""
        return {
            "registered_name": "keras_diffusion>StableDiffusion3ImageToImage",
            "config": {"sampling": {}},
        }
