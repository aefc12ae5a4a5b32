"""Validation and normalisation of `ImageToImage.generate` inputs.

Everything here runs on the host, in numpy, before any model work, so a bad
input fails fast with a message naming the argument and what is accepted.
"""

import dataclasses
import math
import numbers

import numpy as np

from keras_diffusion.models.tokenizer import validate_prompts

INPUT_KEYS = ("images", "prompts", "negative_prompts")
OPTION_NAMES = ("height", "width", "noise", "posterior_noise", "verbose", "callback")


@dataclasses.dataclass
class GenerateSettings:
    """The per-call values of one `generate` call, validated."""

    num_steps: int
    guidance_scale: float
    strength: float
    seed: int | None
    height: int
    width: int
    noise: np.ndarray | None = None
    posterior_noise: np.ndarray | None = None
    verbose: bool = False
    callback: object = None

    @property
    def use_guidance(self):
        return self.guidance_scale > 1.0


def check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value}.")
    return int(value)


def check_float(value, name, low=-math.inf, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number; got {value!r}.")
    value = float(value)
    if math.isnan(value) or not low <= value <= high:
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else "a finite number"
        raise ValueError(f"`{name}` must be {bounds}; got {value}.")
    return value


def check_size(value, name, multiple):
    value = check_int(value, name, multiple)
    if value % multiple:
        raise ValueError(
            f"`{name}` must be a positive multiple of {multiple}; got {value}."
        )
    return value


def to_float_images(images):
    """PIL images, uint8 [0, 255] or float [-1, 1] arrays -> float32 [-1, 1].

    Returns `(images, unbatched)`; images has shape (batch, height, width, 3).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        images = np.asarray(images.convert("RGB"))
    elif (
        Image is not None
        and isinstance(images, (list, tuple))
        and images
        and all(isinstance(i, Image.Image) for i in images)
    ):
        images = np.stack([np.asarray(i.convert("RGB")) for i in images])
    if isinstance(images, (str, bytes, dict)) or images is None:
        raise TypeError(
            "`images` must be an array of shape (height, width, 3) or (batch, "
            "height, width, 3), or PIL images; got "
            f"{type(images).__name__}."
        )
    try:
        array = np.asarray(images)
    except Exception as e:
        raise TypeError(f"`images` could not be read as an array: {e}") from e
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise TypeError(f"`images` must hold numbers; got dtype {array.dtype}.")
    if array.ndim not in (3, 4):
        raise ValueError(
            "`images` must have rank 3 (height, width, 3) or 4 (batch, height, "
            f"width, 3); got shape {array.shape}."
        )
    if array.shape[-1] != 3:
        raise ValueError(
            f"`images` must have 3 (RGB) channels in the last axis; got shape "
            f"{array.shape}. Convert grayscale or RGBA images to RGB first."
        )
    if 0 in array.shape:
        raise ValueError(f"`images` must not be empty; got shape {array.shape}.")
    unbatched = array.ndim == 3
    if unbatched:
        array = array[None]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 127.5 - 1.0, unbatched
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"`images` must be uint8 in [0, 255] or float in [-1, 1]; got dtype "
            f"{array.dtype}."
        )
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError("`images` contains NaN or infinite pixels.")
    low, high = float(array.min()), float(array.max())
    if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
        raise ValueError(
            f"Float `images` must be in [-1, 1]; got values in [{low:.3g}, "
            f"{high:.3g}]. Pass uint8 arrays for [0, 255] pixels."
        )
    return np.clip(array, -1.0, 1.0), unbatched


def normalize_prompts(prompts, name, batch_size):
    """Return a list of `batch_size` strings; a single string is broadcast."""
    if isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = validate_prompts(prompts, name)
    if len(prompts) != batch_size:
        raise ValueError(
            f"`{name}` has {len(prompts)} entries but `images` has a batch of "
            f"{batch_size}; give one prompt per image, or a single string."
        )
    return prompts


def normalize_inputs(inputs):
    """Validate a generate inputs dict; return `(batch, unbatched)`."""
    if not isinstance(inputs, dict):
        raise TypeError(
            "`inputs` must be a dict with keys 'images', 'prompts' and optionally "
            "'negative_prompts', a tf.data.Dataset of such dicts, or an image "
            f"followed by a prompt string; got {type(inputs).__name__}."
        )
    unknown = sorted(set(inputs) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in `inputs`; accepted keys: {list(INPUT_KEYS)}."
        )
    for key in ("images", "prompts"):
        if key not in inputs:
            raise ValueError(f"`inputs` is missing the key {key!r}.")
    images, unbatched = to_float_images(inputs["images"])
    batch_size = images.shape[0]
    if unbatched and not isinstance(inputs["prompts"], str):
        prompts = validate_prompts(inputs["prompts"], "prompts")
        if len(prompts) != 1:
            raise ValueError(
                "`prompts` must be a single string when `images` is a single image; "
                f"got {len(prompts)} prompts."
            )
    prompts = normalize_prompts(inputs["prompts"], "prompts", batch_size)
    negative = inputs.get("negative_prompts")
    negative = normalize_prompts(
        "" if negative is None else negative, "negative_prompts", batch_size
    )
    batch = {"images": images, "prompts": prompts, "negative_prompts": negative}
    return batch, unbatched


def check_noise(noise, name, shape):
    if noise is None:
        return None
    array = np.asarray(noise)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"`{name}` must be a float array; got dtype {array.dtype}.")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(
            f"`{name}` must have shape (batch, height/8, width/8, channels) = "
            f"{tuple(shape)}; got {tuple(array.shape)}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return array.astype(np.float32)


def to_uint8(images):
    """Decoded images in [-1, 1] -> uint8, rounded as diffusers does."""
    images = np.asarray(images, dtype=np.float32)
    return np.round(np.clip(images / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)
