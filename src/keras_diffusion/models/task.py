"""Base class for tasks: a backbone plus a preprocessor plus task logic."""

import keras

from keras_diffusion.api_export import register
from keras_diffusion.models.backbone import Backbone, _all_subclasses
from keras_diffusion.models.preprocessor import Preprocessor
from keras_diffusion.presets import catalogue, serialization
from keras_diffusion.presets.loader import open_preset
from keras_diffusion.presets.preset_io import save_preset
from keras_diffusion.utils.python_utils import classproperty


@register
class Task(keras.Model):
    """A `keras.Model` wrapping a `Backbone` and a `Preprocessor`.

    Subclasses set `backbone_cls` and `preprocessor_cls`, which is how
    `Task.from_preset` called on a base class finds the right subclass for a
    preset. Task-specific constructor arguments go into `task.json`.

    Examples:
    ```python
    task = keras_diffusion.models.ImageToImage.from_preset("sd3_tiny_demo")
    task.backbone, task.preprocessor
    ```
    """

    backbone_cls = None
    preprocessor_cls = None

    def __init__(self, backbone, preprocessor=None, **kwargs):
        super().__init__(**kwargs)
        self._backbone = backbone
        self._preprocessor = preprocessor

    @property
    def backbone(self):
        """The `Backbone` with the core architecture."""
        return self._backbone

    @property
    def preprocessor(self):
        """The `Preprocessor` used to turn raw inputs into model inputs."""
        return self._preprocessor

    def get_config(self):
        return {
            **self.task_config(),
            "backbone": serialization.serialize(self.backbone),
            "preprocessor": (
                None
                if self.preprocessor is None
                else serialization.serialize(self.preprocessor)
            ),
        }

    def task_config(self):
        """The task's own arguments (no backbone, no preprocessor)."""
        return {"name": self.name, "trainable": self.trainable}

    def serialize_task_config(self):
        return {
            "registered_name": serialization.serialize(self)["registered_name"],
            "config": self.task_config(),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = serialization.deserialize(
            config["backbone"], Backbone, source="task.backbone"
        )
        if config.get("preprocessor") is not None:
            config["preprocessor"] = serialization.deserialize(
                config["preprocessor"], Preprocessor, source="task.preprocessor"
            )
        return cls(**config)

    @classproperty
    def presets(cls):
        """The built-in presets this task can load, as `{name: entry}`."""
        if cls.backbone_cls is None:
            return catalogue.entries_for(None)
        return cls.backbone_cls.presets

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Build a task from a preset, inferring the subclass when needed.

        Args:
            preset: a built-in name, a `kaggle://` or `hf://` handle, or a local
                preset folder.
            load_weights: load the saved weights (else random initialisation).
            **kwargs: `dtype` overrides the saved dtype policy; other keys
                override the task's own config.
        """
        folder = open_preset(preset)
        dtype = kwargs.pop("dtype", None)
        task_config = folder.task_config()
        if task_config is not None:
            task_cls = serialization.registered_class(
                task_config.get("registered_name"), Task, f"{preset}/task.json"
            )
            if not issubclass(task_cls, cls):
                raise ValueError(
                    f"Preset {preset!r} holds a {task_cls.__name__}, which is not a "
                    f"{cls.__name__}."
                )
            config = dict(task_config.get("config", {}))
        else:
            task_cls = cls._task_class_for(folder.backbone_class(Backbone), preset)
            config = {}
        builtin = _builtin_sampling(preset)
        if builtin:
            config["sampling"] = {**builtin, **config.get("sampling", {})}
        config.update(kwargs)
        backbone = folder.load_backbone(task_cls.backbone_cls, load_weights, dtype)
        preprocessor = None
        if folder.has("preprocessor.json"):
            preprocessor = folder.load_preprocessor(task_cls.preprocessor_cls)
        try:
            return task_cls(backbone=backbone, preprocessor=preprocessor, **config)
        except (TypeError, ValueError) as e:
            if "keyword" not in str(e):
                raise
            raise TypeError(f"Bad argument for {task_cls.__name__}: {e}") from e

    @classmethod
    def _task_class_for(cls, backbone_cls, preset):
        candidates = [
            sub
            for sub in [cls, *_all_subclasses(cls)]
            if sub.backbone_cls is not None
            and issubclass(backbone_cls, sub.backbone_cls)
        ]
        if not candidates:
            raise ValueError(
                f"No {cls.__name__} subclass can run a {backbone_cls.__name__} "
                f"(preset {preset!r})."
            )
        # The most specific match: a class whose backbone_cls is the closest.
        candidates.sort(key=lambda sub: len(sub.backbone_cls.__mro__), reverse=True)
        return candidates[0]

    def save_to_preset(self, preset_dir):
        """Save backbone, preprocessor and task config to `preset_dir`, atomically."""
        save_preset(
            preset_dir,
            backbone=self.backbone,
            preprocessor=self.preprocessor,
            task=self,
        )


def _builtin_sampling(preset):
    """The catalogue's sampling defaults when `preset` is a built-in name."""
    if not isinstance(preset, str) or preset not in catalogue.names():
        return {}
    return dict(catalogue.get(preset).get("sampling", {}))
