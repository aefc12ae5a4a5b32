"""A tiny test-only backbone, tokenizer, preprocessor and task.

They exercise the base machinery (presets, handles, generate plumbing)
without the cost of a real model.
"""

import json
import os

import keras
import numpy as np
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.models import Backbone, ImageToImage, Preprocessor, Tokenizer


@register
class ToyBackbone(Backbone):
    def __init__(self, hidden_dim=4, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.encoder = keras.layers.Dense(
            hidden_dim, name="encoder", dtype=self.dtype_policy
        )
        self.decoder = keras.layers.Dense(3, name="decoder", dtype=self.dtype_policy)
        self.text_embedding = keras.layers.Embedding(
            16, 3, name="text_embedding", dtype=self.dtype_policy
        )
        self.encoder.build((None, 3))
        self.decoder.build((None, hidden_dim))
        self.text_embedding.build((None, None))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "hidden_dim": self.hidden_dim}

    def call(self, images):
        return self.decoder(self.encoder(images))


@register
class ToyTokenizer(Tokenizer):
    asset_files = ("words.json",)

    def __init__(self, words=None, sequence_length=4):
        self.words = words
        self.sequence_length = sequence_length

    def tokenize(self, prompts):
        ids = np.zeros((len(prompts), self.sequence_length), dtype=np.int32)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(prompt.split()[: self.sequence_length]):
                ids[i, j] = self.words.get(word, 1)
        return ids

    def get_config(self):
        return {"sequence_length": self.sequence_length}

    def save_assets(self, dir_path):
        with open(os.path.join(dir_path, "words.json"), "w") as f:
            json.dump(self.words, f)

    def load_assets(self, dir_path):
        with open(os.path.join(dir_path, "words.json")) as f:
            self.words = json.load(f)


@register
class ToyPreprocessor(Preprocessor):
    tokenizer_names = ("tokenizer",)

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def generate_preprocess(self, prompts):
        return self.tokenizer(prompts)


@register
class ToyImageToImage(ImageToImage):
    """Latents are the pixels; the 'denoiser' pulls towards a prompt colour."""

    backbone_cls = ToyBackbone
    preprocessor_cls = ToyPreprocessor

    def default_resolution(self):
        return (16, 16)

    def latent_shape(self, height, width):
        return (height, width, 3)

    def schedule(self, num_steps, strength):
        sigmas = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
        return sigmas, int(max(num_steps - min(num_steps * strength, num_steps), 0))

    def encode_text(self, prompts, negative_prompts, use_guidance):
        ids = self.preprocessor.generate_preprocess(prompts)
        colour = ops.mean(self.backbone.text_embedding(ids), axis=1)
        return ops.tanh(colour)

    def encode_image(self, images, posterior_noise):
        return images + 0.01 * posterior_noise

    def denoise(self, latents, noise, conditioning, sigmas, start_index, settings):
        noise = ops.convert_to_tensor(noise)
        latents = ops.convert_to_tensor(latents)
        x = sigmas[start_index] * noise + (1 - sigmas[start_index]) * latents
        target = conditioning[:, None, None, :]
        for i in range(start_index, settings.num_steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * (0.5 * noise - target)
        return x

    def decode(self, latents):
        return ops.tanh(self.backbone(latents))


def make_toy_task(dtype=None):
    backbone = ToyBackbone(hidden_dim=4, dtype=dtype)
    tokenizer = ToyTokenizer(
        words={"red": 2, "blue": 3, "circle": 4}, sequence_length=4
    )
    return ToyImageToImage(backbone, ToyPreprocessor(tokenizer))
