"""Load a diffusers-layout SD3 folder (recognised by `model_index.json`).

The folder is converted on the fly: configs are mapped to our constructor
arguments, and each component's safetensors are read lazily, one tensor at a
time, straight into the built model. Pickle-only components (`.bin`, `.ckpt`)
are refused, never unpickled.
"""

import contextlib
import contextvars
import glob
import os
import re

from keras_diffusion.converters import diffusers_mmdit, diffusers_vae, transformers_text
from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.converters.sd3_checkpoint import SD3Checkpoint
from keras_diffusion.utils.python_utils import read_json

MODEL_INDEX = "model_index.json"
PIPELINES = (
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
)
COMPONENT_CLASSES = {
    "transformer": ("SD3Transformer2DModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModelWithProjection",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "text_encoder_3": ("T5EncoderModel", None),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_3": ("T5TokenizerFast", "T5Tokenizer", None),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
    # IP-adapter parts of the pipeline; img2img does not use them.
    "image_encoder": (None,),
    "feature_extractor": (None,),
}
REQUIRED = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
)
CLIP_SEQUENCE_LENGTH = 77
T5_SEQUENCE_LENGTH = 256


_PROGRESS = contextvars.ContextVar("diffusers_folder_progress", default=None)


@contextlib.contextmanager
def reporting_progress(callback):
    """Call `callback(component)` after each component's weights are read.

    Covers every diffusers-folder load in the block, however it is reached
    (`ImageToImage.from_preset(folder)` included).

    Examples:

    >>> with reporting_progress(lambda name: print("converted", name)):
    ...     pass  # e.g. keras_diffusion.models.ImageToImage.from_preset(folder)
    """
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def is_diffusers_folder(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


# `model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`, ...
_VARIANT = re.compile(r"\.(fp16|bf16)(-\d+-of-\d+)?\.safetensors$")


def safetensors_files(folder, component):
    """The safetensors of one component: the plain files, else one variant's.

    A folder may hold the same weights twice, plain and as a half-precision
    variant (`model-00001-of-00002.safetensors` next to
    `model.fp16-00001-of-00002.safetensors`); only one set is read.

    Examples:

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for name in ["a-00001-of-00002", "a-00002-of-00002", "a.fp16-00001-of-00002"]:
    ...     open(os.path.join(folder, name + ".safetensors"), "w").close()
    >>> [os.path.basename(f) for f in safetensors_files(folder, "text_encoder_3")]
    ['a-00001-of-00002.safetensors', 'a-00002-of-00002.safetensors']
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"The diffusers folder is missing its {component!r} folder."
        )
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    variants = {}
    for f in files:
        match = _VARIANT.search(os.path.basename(f))
        variants.setdefault(match.group(1) if match else "", []).append(f)
    if variants:
        return variants.get("", variants.get("fp16") or variants.get("bf16"))
    pickles = [
        f for f in os.listdir(folder) if f.endswith((".bin", ".ckpt", ".pt", ".pth"))
    ]
    if pickles:
        raise ValueError(
            f"Component {component!r} has only pickle weights ({', '.join(pickles)}). "
            "keras_diffusion never unpickles files; convert them to safetensors first."
        )
    raise FileNotFoundError(f"Component {component!r} has no .safetensors weights.")


def _json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The diffusers folder is missing {what} ({path}).")
    return read_json(path, f"Corrupt {what} ({path})")


class DiffusersFolder(SD3Checkpoint):
    """A diffusers SD3 folder, offering the same methods as a PresetFolder."""

    def __init__(self, path, handle=None):
        self.path = os.fspath(path)
        self.handle = handle or self.path
        index = _json(os.path.join(self.path, MODEL_INDEX), MODEL_INDEX)
        pipeline = index.get("_class_name")
        if pipeline not in PIPELINES:
            raise ValueError(
                f"{self.handle}: model_index.json names pipeline {pipeline!r}; "
                f"supported: {', '.join(PIPELINES)}."
            )
        self.components = {}
        for name, spec in index.items():
            if name.startswith("_"):
                continue
            cls = (
                spec[1] if isinstance(spec, (list, tuple)) and len(spec) == 2 else None
            )
            if name not in COMPONENT_CLASSES or cls not in COMPONENT_CLASSES[name]:
                raise ValueError(
                    f"{self.handle}: model_index.json names unknown component "
                    f"{name!r} of class {cls!r}; supported: "
                    + ", ".join(f"{k}: {v}" for k, v in COMPONENT_CLASSES.items())
                )
            if cls is not None:
                self.components[name] = cls
        missing = [c for c in REQUIRED if c not in self.components]
        if missing:
            raise ValueError(
                f"{self.handle}: model_index.json lacks components {missing}."
            )
        for name in self.components:
            if not os.path.isdir(self._dir(name)):
                raise FileNotFoundError(
                    f"{self.handle}: component folder {name!r} is missing."
                )
        self.has_t5 = "text_encoder_3" in self.components and "tokenizer_3" in (
            self.components
        )

    def _dir(self, name):
        return os.path.join(self.path, name)

    def _config(self, name, file="config.json"):
        return _json(os.path.join(self._dir(name), file), f"{name}/{file}")

    # -------------------------------------------------------------- backbone
    def backbone_config(self):
        transformer = self._config("transformer")
        vae = diffusers_vae.vae_kwargs(self._config("vae"))
        scheduler = {}
        if os.path.isfile(
            os.path.join(self._dir("scheduler"), "scheduler_config.json")
        ):
            scheduler = self._config("scheduler", "scheduler_config.json")
        factor = 2 ** (len(vae["block_channels"]) - 1)
        size = int(transformer.get("sample_size", 128)) * factor
        return {
            "clip_l": transformers_text.clip_text_encoder_kwargs(
                self._config("text_encoder")
            ),
            "clip_g": transformers_text.clip_text_encoder_kwargs(
                self._config("text_encoder_2")
            ),
            "t5": (
                transformers_text.t5_encoder_kwargs(self._config("text_encoder_3"))
                if self.has_t5
                else None
            ),
            "t5_sequence_length": T5_SEQUENCE_LENGTH,
            "mmdit": diffusers_mmdit.mmdit_kwargs(transformer),
            "vae": vae,
            "scheduler_shift": float(scheduler.get("shift", 3.0)),
            "height": size,
            "width": size,
        }

    def load_weights(self, backbone, progress=None):
        progress = progress or _PROGRESS.get()
        steps = [
            ("text_encoder", backbone.clip_l, transformers_text.load_clip_text_encoder),
            (
                "text_encoder_2",
                backbone.clip_g,
                transformers_text.load_clip_text_encoder,
            ),
            ("transformer", backbone.mmdit, diffusers_mmdit.load_mmdit),
            ("vae", backbone.vae, diffusers_vae.load_vae),
        ]
        if self.has_t5 and backbone.t5 is not None:
            steps.insert(
                2, ("text_encoder_3", backbone.t5, transformers_text.load_t5_encoder)
            )
        for name, layer, load in steps:
            source = TensorSource.from_files(safetensors_files(self._dir(name), name))
            try:
                load(layer, source)
            except (KeyError, ValueError) as e:
                raise ValueError(f"{self.handle}: cannot convert {name!r}: {e}") from e
            if progress is not None:
                progress(name)

    # ---------------------------------------------------------- preprocessor
    def has(self, name):
        return name == "preprocessor.json"

    def load_preprocessor(self, expected_base=None):
        from keras_diffusion.models.stable_diffusion_3 import (
            stable_diffusion_3_preprocessor as module,
        )
        from keras_diffusion.models.stable_diffusion_3.clip_tokenizer import (
            CLIPTokenizer,
        )
        from keras_diffusion.models.stable_diffusion_3.clip_tokenizer_files import (
            load_clip_tokenizer_files,
            read_pad_token,
        )

        StableDiffusion3Preprocessor = module.StableDiffusion3Preprocessor

        def clip(name):
            folder = self._dir(name)
            vocabulary, merges = load_clip_tokenizer_files(folder)
            return CLIPTokenizer(
                vocabulary,
                merges,
                sequence_length=CLIP_SEQUENCE_LENGTH,
                pad_token=read_pad_token(folder),
            )

        t5 = None
        if self.has_t5:
            from keras_diffusion.models.stable_diffusion_3.t5_tokenizer import (
                T5Tokenizer,
            )

            folder = self._dir("tokenizer_3")
            for file in ("tokenizer.json", "spiece.model"):
                if os.path.isfile(os.path.join(folder, file)):
                    t5 = T5Tokenizer(
                        os.path.join(folder, file), sequence_length=T5_SEQUENCE_LENGTH
                    )
                    break
            else:
                raise FileNotFoundError(
                    f"{self.handle}: tokenizer_3 has neither tokenizer.json nor "
                    "spiece.model."
                )
        return StableDiffusion3Preprocessor(clip("tokenizer"), clip("tokenizer_2"), t5)


def register():
    from keras_diffusion.presets.loader import register_format

    register_format("diffusers", is_diffusers_folder, DiffusersFolder)
