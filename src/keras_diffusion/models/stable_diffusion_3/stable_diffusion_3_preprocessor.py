"""`StableDiffusion3Preprocessor`: prompts -> CLIP-L, CLIP-G and T5 token ids."""

import numpy as np

from keras_diffusion.api_export import register
from keras_diffusion.models.generate_inputs import to_float_images
from keras_diffusion.models.preprocessor import Preprocessor
from keras_diffusion.models.tokenizer import validate_prompts


@register
class StableDiffusion3Preprocessor(Preprocessor):
    """Tokenizes prompts for SD3's text encoders.

    Args:
        clip_l_tokenizer: a `CLIPTokenizer` padding with the end token.
        clip_g_tokenizer: a `CLIPTokenizer` padding with "!" (id 0).
        t5_tokenizer: a `T5Tokenizer`, or None when the model has no T5.

    Examples:
    ```python
    preprocessor = keras_diffusion.models.StableDiffusion3Preprocessor.from_preset(
        "sd3_tiny_demo"
    )
    ids = preprocessor.generate_preprocess(["a red circle on a blue background"])
    ids["clip_l"].shape  # (1, 12): the demo's prompt length (77 for real SD3)
    ```
    """

    tokenizer_names = ("clip_l_tokenizer", "clip_g_tokenizer", "t5_tokenizer")

    def __init__(self, clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer=None):
        self.clip_l_tokenizer = clip_l_tokenizer
        self.clip_g_tokenizer = clip_g_tokenizer
        self.t5_tokenizer = t5_tokenizer

    def generate_preprocess(self, prompts):
        """A list of prompts -> dict of int32 token id arrays."""
        prompts = validate_prompts(prompts, "prompts")
        ids = {
            "clip_l": self.clip_l_tokenizer.tokenize(prompts),
            "clip_g": self.clip_g_tokenizer.tokenize(prompts),
        }
        if self.t5_tokenizer is not None:
            ids["t5"] = self.t5_tokenizer.tokenize(prompts)
        return ids

    def __call__(self, inputs):
        """Training inputs `{"images", "prompts"}` -> images and token ids."""
        if not isinstance(inputs, dict) or set(inputs) != {"images", "prompts"}:
            raise ValueError(
                "Training inputs must be a dict with exactly the keys 'images' and "
                f"'prompts'; got {_describe(inputs)}."
            )
        images, unbatched = to_float_images(inputs["images"])
        prompts = validate_prompts(inputs["prompts"], "prompts")
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"`prompts` has {len(prompts)} entries for {images.shape[0]} images."
            )
        return {"images": np.asarray(images), **self.generate_preprocess(prompts)}


def _describe(inputs):
    return sorted(inputs) if isinstance(inputs, dict) else repr(inputs)
