"""Turning `fit` / `evaluate` / `precompute` inputs into model inputs.

Three kinds of input reach the training step, as a dict of arrays or a
batched `tf.data.Dataset` of dicts:

- raw: `{"images", "prompts"}`; images uint8 in [0, 255] or float in
  [-1, 1]. The task's preprocessor turns them into float images and token
  ids: on the host, once, for arrays; inside the pipeline, through
  `tf.numpy_function`, for a dataset.
- preprocessed: `{"images", <token id keys>}`, what the preprocessor returns.
- cached: `{"latent_mean", "latent_log_variance", <conditioning keys>}`,
  what `precompute` returns. The frozen encoders are skipped.

Examples:
```python
task = keras_diffusion.models.ImageToImage.from_preset("sd3_tiny_demo")
images = np.zeros((2, 64, 64, 3), dtype="uint8")
model_inputs = prepare(task, {"images": images, "prompts": ["a", "b"]})
sorted(model_inputs)  # ['clip_g', 'clip_l', 'images']
```
"""

import numpy as np

LATENT_KEYS = ("latent_mean", "latent_log_variance")
RAW_KEYS = ("images", "prompts")


def is_dataset(inputs):
    return type(inputs).__module__.startswith("tensorflow") and hasattr(
        inputs, "element_spec"
    )


def is_cached(keys):
    return all(k in keys for k in LATENT_KEYS)


def prepare(task, inputs):
    """Raw, preprocessed or cached inputs -> model inputs (same container)."""
    if is_dataset(inputs):
        return _prepare_dataset(task, inputs)
    if not isinstance(inputs, dict):
        raise TypeError(
            "Training inputs must be a dict {'images', 'prompts'} (or the output "
            "of `precompute`), or a tf.data.Dataset of such dicts; got "
            f"{type(inputs).__name__}."
        )
    if "prompts" in inputs:
        return dict(_preprocessor(task)(inputs))
    _check_keys(task, inputs.keys())
    return {k: np.asarray(v) for k, v in inputs.items()}


def _preprocessor(task):
    if task.preprocessor is None:
        raise ValueError("This task has no preprocessor; it cannot read prompts.")
    return task.preprocessor


def _check_keys(task, keys):
    keys = set(keys)
    if is_cached(keys) or "images" in keys and len(keys) > 1:
        return
    raise ValueError(
        "Training inputs must have the keys 'images' and 'prompts', or be the "
        f"output of the preprocessor or of `precompute`; got {sorted(keys)}."
    )


def _prepare_dataset(task, dataset):
    import tensorflow as tf

    spec = dataset.element_spec
    if not isinstance(spec, dict):
        raise TypeError(
            "A tf.data.Dataset passed for training must yield dicts; it yields "
            f"{type(spec).__name__}."
        )
    if "prompts" not in spec:
        _check_keys(task, spec.keys())
        return dataset
    if set(spec) != set(RAW_KEYS):
        raise ValueError(
            f"The dataset's elements must have exactly the keys {list(RAW_KEYS)}; "
            f"got {sorted(spec)}."
        )
    if spec["images"].shape.rank != 4 or spec["prompts"].shape.rank != 1:
        raise ValueError(
            "The dataset must be batched (images (batch, height, width, 3), "
            "prompts (batch,)): call `dataset.batch(batch_size)` first."
        )
    preprocessor = _preprocessor(task)
    probe = preprocessor.generate_preprocess([""])
    keys = list(probe)
    lengths = [probe[k].shape[1] for k in keys]

    def run(images, prompts):
        out = preprocessor({"images": images, "prompts": prompts})
        return [out["images"].astype(np.float32)] + [
            out[k].astype(np.int32) for k in keys
        ]

    def convert(element):
        outputs = tf.numpy_function(
            run,
            [element["images"], element["prompts"]],
            [tf.float32] + [tf.int32] * len(keys),
            stateful=False,
        )
        images = outputs[0]
        images.set_shape(element["images"].shape)
        result = {"images": images}
        for key, length, ids in zip(keys, lengths, outputs[1:]):
            ids.set_shape(element["prompts"].shape.concatenate([length]))
            result[key] = ids
        return result

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def batches(data, batch_size):
    """Yield dicts of numpy arrays, `batch_size` rows at a time."""
    if is_dataset(data):
        yield from data.as_numpy_iterator()
        return
    total = len(next(iter(data.values())))
    for start in range(0, total, batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}
