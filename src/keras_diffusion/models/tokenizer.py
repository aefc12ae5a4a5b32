"""Base class for tokenizers: plain Python, no TensorFlow needed."""

import os

import numpy as np

from keras_diffusion.api_export import register


@register
class Tokenizer:
    """Turns a list of strings into a fixed-length int32 id array.

    Subclasses implement `tokenize(list_of_str) -> np.ndarray[int32]` of
    shape `(batch, sequence_length)`, `get_config()`, and their file assets:
    `asset_files` names the files `save_assets(dir)` writes and
    `load_assets(dir)` reads. A preset keeps them under
    `assets/<preprocessor attribute>/`.

    A tokenizer built from config alone (`from_config`) has no vocabulary
    until `load_assets` runs; the preset loader does this.
    """

    asset_files = ()
    sequence_length = None  # set by subclasses: the fixed output length

    def __call__(self, inputs):
        return self.tokenize(validate_prompts(inputs, "inputs"))

    def tokenize(self, prompts):
        raise NotImplementedError  # abstract hook

    def tf_tokenize(self, prompts):
        """Tokenize a `tf.string` tensor (scalar or batch) inside `tf.data`.

        Returns int32 ids of shape `prompts.shape + (sequence_length,)`.
        """
        import tensorflow as tf

        def _run(values):
            return self.tokenize([v.decode("utf-8") for v in values.reshape(-1)])

        flat = tf.reshape(prompts, [-1])
        ids = tf.numpy_function(_run, [flat], tf.int32)
        return tf.reshape(
            ids, tf.concat([tf.shape(prompts), [self.sequence_length]], 0)
        )

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save_assets(self, dir_path):
        raise NotImplementedError  # abstract hook

    def load_assets(self, dir_path):
        raise NotImplementedError  # abstract hook

    def missing_assets(self, dir_path):
        return [
            f for f in self.asset_files if not os.path.exists(os.path.join(dir_path, f))
        ]


def validate_prompts(prompts, name):
    """Return `prompts` as a list of str, or raise a clear TypeError."""
    if isinstance(prompts, bytes):
        prompts = prompts.decode("utf-8")
    if isinstance(prompts, np.ndarray) and prompts.ndim == 0:
        prompts = prompts.item()
        prompts = prompts.decode("utf-8") if isinstance(prompts, bytes) else prompts
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 1:
            raise TypeError(
                f"`{name}` must be a string or a flat list of strings; got an "
                f"array of shape {prompts.shape}."
            )
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(
            f"`{name}` must be a string or a list of strings; got "
            f"{type(prompts).__name__}."
        )
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, bytes):
            p = p.decode("utf-8")
        if not isinstance(p, str):
            raise TypeError(
                f"`{name}[{i}]` must be a string; got {type(p).__name__} "
                f"({p!r:.40}). Nested lists and None are not accepted."
            )
        out.append(p)
    return out
