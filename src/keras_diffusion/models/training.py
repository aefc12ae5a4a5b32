"""Fine-tuning with `model.fit`: the rectified-flow objective, written once.

`RectifiedFlowTraining` is mixed into `ImageToImage`. It plugs into Keras'
own training loop through `call`, `compute_loss` and `compute_metrics`, so
`fit`, `evaluate` and `predict` run the backend's usual train / test step
(jax: jitted and stateless; tensorflow: `tf.function`; torch: eager with
autograd). One step, for a batch of images and prompt token ids:

1. the images are encoded to the VAE posterior `(mean, log_variance)` and
   sampled, shifted and scaled: `x0`. The posterior is *sampled*, not taken
   at its mean, as diffusers' `train_dreambooth_sd3` does (also with its
   latent cache, which keeps the distribution and samples every step): the
   sample is what the model was trained on, and a free augmentation;
2. with probability `prompt_dropout` a prompt is replaced by "" (its token
   ids, or with cached inputs its embedding), so classifier-free guidance
   keeps an unconditional model to work with;
3. `eps ~ N(0, 1)`; `t` is drawn logit-normal (`sigmoid(N(logit_mean,
   logit_std))`, SD3's choice) or uniform in [0, 1];
4. `x_t = (1 - t) x0 + t eps`; the target velocity is `v = eps - x0`;
5. the loss is the compiled loss (default MSE) between the denoiser's
   prediction at timestep `1000 t` and `v`.

Note diffusers' SD3 scripts map the drawn `u` through the *shifted*
discrete scheduler (`sigma = shift u / (1 + (shift - 1) u)`); here `t` is
used as drawn, as in the SD3 paper.

The random draws use `keras.random` with the task's `seed_generator`, in
the fixed order: prompt dropout, posterior noise, `t`, `eps`. They are
traced correctly under jit on every backend, and the same seed-generator
state gives the same draws with raw or cached inputs.

Subclasses implement four in-graph hooks: `train_encode_images`,
`train_encode_prompts`, `train_latents` and `train_velocity`.

Examples:
```python
task = keras_diffusion.models.ImageToImage.from_preset(
    "sd3_tiny_demo", timestep_sampling="uniform", prompt_dropout=0.2, seed=0
)
images = np.zeros((2, 64, 64, 3), dtype="uint8")
inputs = {"images": images, "prompts": ["a red circle", "a blue square"]}
task.compile(optimizer=keras.optimizers.AdamW(1e-4))
task.fit(inputs, batch_size=2, epochs=1)
task.evaluate(task.precompute(inputs), batch_size=2)  # the same loss, cached
```
"""

import keras
import numpy as np
from keras import ops

from keras_diffusion.models import lora
from keras_diffusion.models import training_inputs as ti

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


class RectifiedFlowTraining:
    """The `fit` half of `ImageToImage` (see the module docstring)."""

    # None: `fit` leaves the components' trainable flags as they are.
    default_trainable_components = None

    def _init_training(
        self,
        timestep_sampling="logit_normal",
        logit_mean=0.0,
        logit_std=1.0,
        prompt_dropout=0.1,
        trainable_components=None,
        seed=None,
    ):
        self._set_training_options(timestep_sampling, prompt_dropout)
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="training_seed")
        self.trainable_components = trainable_components

    def _set_training_options(self, timestep_sampling=None, prompt_dropout=None):
        if timestep_sampling is not None:
            if timestep_sampling not in TIMESTEP_SAMPLINGS:
                raise ValueError(
                    f"`timestep_sampling` must be one of {TIMESTEP_SAMPLINGS}; got "
                    f"{timestep_sampling!r}."
                )
            self.timestep_sampling = timestep_sampling
        if prompt_dropout is not None:
            prompt_dropout = float(prompt_dropout)
            if not 0.0 <= prompt_dropout <= 1.0:
                raise ValueError(
                    f"`prompt_dropout` must be in [0, 1]; got {prompt_dropout}."
                )
            self.prompt_dropout = prompt_dropout

    def training_config(self):
        return {
            "timestep_sampling": self.timestep_sampling,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "prompt_dropout": self.prompt_dropout,
            "trainable_components": (
                None
                if self.trainable_components is None
                else list(self.trainable_components)
            ),
            "seed": self.seed,
        }

    @property
    def trainable_components(self):
        """Names of the backbone components `fit` trains; the rest is frozen.

        Setting it sets the components' `trainable` flags (do it before
        `compile()`). With LoRA enabled on the backbone only the adapters
        train, whatever this says. None (the base default) leaves the flags
        alone.
        """
        return self._trainable_components

    @trainable_components.setter
    def trainable_components(self, names):
        names = self.default_trainable_components if names is None else names
        if names is None:
            self._trainable_components = None
            return
        names = (names,) if isinstance(names, str) else tuple(names)
        components = {
            layer.name: layer
            for layer in self.backbone._flatten_layers(
                include_self=False, recursive=False
            )
        }
        unknown = sorted(set(names) - set(components))
        if unknown:
            raise ValueError(
                f"Unknown trainable component(s) {unknown}; the backbone has "
                f"{sorted(components)}."
            )
        for name, layer in components.items():
            layer.trainable = name in names
        if self.backbone.lora_config is not None:
            lora.freeze_all_but_lora(self.backbone)
        self._trainable_components = names

    # ------------------------------------------------------------------ hooks
    def train_encode_images(self, images):
        """Float images in [-1, 1] -> the latent posterior `(mean, log_var)`."""
        raise NotImplementedError  # abstract hook

    def train_encode_prompts(self, token_ids):
        """Dict of token ids -> dict of conditioning tensors (batch first)."""
        raise NotImplementedError  # abstract hook

    def train_latents(self, mean, log_variance, noise):
        """Sample the posterior with `noise` -> x0 in the denoiser's space."""
        raise NotImplementedError  # abstract hook

    def train_velocity(self, latents, t, conditioning):
        """The denoiser's velocity at `t` in [0, 1] (timestep `1000 t`)."""
        raise NotImplementedError  # abstract hook

    # ------------------------------------------------------------- the step
    def call(self, inputs, training=False):
        """Model inputs -> `(predicted velocity, target velocity)`."""
        inputs = dict(inputs)
        cached = ti.is_cached(inputs)
        if cached:
            mean = inputs.pop("latent_mean")
            log_variance = inputs.pop("latent_log_variance")
        else:
            mean, log_variance = self.train_encode_images(inputs.pop("images"))
        mean = ops.cast(mean, "float32")
        batch = ops.shape(mean)[0]
        seed = self.seed_generator
        drop = keras.random.uniform((batch,), seed=seed) < self.prompt_dropout
        if cached:
            conditioning = inputs
            if self.prompt_dropout > 0:
                empty = self.train_encode_prompts(self._empty_prompt_ids())
                conditioning = {
                    k: _where(drop, ops.stop_gradient(empty[k]), v)
                    for k, v in inputs.items()
                }
        else:
            empty = self._empty_prompt_ids()
            ids = {k: _where(drop, empty[k], v) for k, v in inputs.items()}
            conditioning = self.train_encode_prompts(ids)
        posterior_noise = keras.random.normal(ops.shape(mean), seed=seed)
        x0 = ops.cast(
            self.train_latents(mean, log_variance, posterior_noise), "float32"
        )
        if self.timestep_sampling == "uniform":
            t = keras.random.uniform((batch,), seed=seed)
        else:
            logits = keras.random.normal(
                (batch,), mean=self.logit_mean, stddev=self.logit_std, seed=seed
            )
            t = ops.sigmoid(logits)
        eps = keras.random.normal(ops.shape(x0), seed=seed)
        t_b = ops.reshape(t, (-1,) + (1,) * (len(x0.shape) - 1))
        x_t = (1.0 - t_b) * x0 + t_b * eps
        prediction = self.train_velocity(x_t, t, conditioning)
        return ops.cast(prediction, "float32"), eps - x0

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        prediction, target = y_pred
        return super().compute_loss(x, target, prediction, sample_weight, training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        prediction, target = y_pred
        return super().compute_metrics(x, target, prediction, sample_weight)

    def _empty_prompt_ids(self):
        ids = self.preprocessor.generate_preprocess([""])
        return {k: ops.convert_to_tensor(v) for k, v in ids.items()}

    # ------------------------------------------------------------ the loops
    def fit(self, x=None, y=None, batch_size=None, validation_data=None, **kwargs):
        """Fine-tune with the rectified-flow objective; see the module doc.

        Args:
            x: `{"images", "prompts"}` (arrays or lists), the output of
                `precompute`, or a batched `tf.data.Dataset` of either.
            y: must be None: the targets are made in the step.
            batch_size, validation_data, **kwargs: as `keras.Model.fit`.
        """
        _no_targets(y)
        if validation_data is not None:
            validation_data = ti.prepare(self, validation_data)
        return super().fit(
            ti.prepare(self, x),
            batch_size=batch_size,
            validation_data=validation_data,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        """The training loss on `x` (same inputs as `fit`), without updates."""
        _no_targets(y)
        return super().evaluate(ti.prepare(self, x), batch_size=batch_size, **kwargs)

    def predict(self, x, batch_size=None, **kwargs):
        """`(predicted, target)` velocities for `x` (same inputs as `fit`)."""
        return super().predict(ti.prepare(self, x), batch_size=batch_size, **kwargs)

    def precompute(self, inputs, batch_size=8):
        """Run the frozen encoders once; `fit` then skips them.

        Returns a dict of numpy arrays: the posterior `latent_mean` and
        `latent_log_variance` (the posterior is still sampled every step)
        and the prompt conditioning (SD3: `context`, `pooled`). Pass it to
        `fit` / `evaluate` as is, or as a `tf.data.Dataset` of batches. Only
        valid while the VAE and text encoders stay frozen. Prompt dropout
        still applies: dropped prompts get the embedding of "".

        Examples:
        ```python
        task = keras_diffusion.models.ImageToImage.from_preset("sd3_tiny_demo")
        images = np.zeros((2, 64, 64, 3), "uint8")
        cache = task.precompute({"images": images, "prompts": ["a", "b"]})
        task.compile()
        task.fit(cache, batch_size=2, epochs=1)
        ```
        """
        data = ti.prepare(self, inputs)
        keys = data.element_spec if ti.is_dataset(data) else data
        if ti.is_cached(keys):
            raise ValueError("These inputs are already precomputed.")

        def encode(images, ids):
            mean, log_variance = self.train_encode_images(images)
            return {
                "latent_mean": mean,
                "latent_log_variance": log_variance,
                **self.train_encode_prompts(ids),
            }

        fn = self._function(("precompute",), encode)
        parts = []
        for batch in ti.batches(data, batch_size):
            images = ops.convert_to_tensor(batch.pop("images"), "float32")
            ids = {k: ops.convert_to_tensor(v) for k, v in batch.items()}
            out = fn(images, ids)
            parts.append({k: ops.convert_to_numpy(v) for k, v in out.items()})
        if not parts:
            raise ValueError("`precompute` got no inputs.")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _where(mask, replacement, value):
    """Per example: `replacement` (batch 1, broadcast) where `mask`, else `value`."""
    shape = (-1,) + (1,) * (len(value.shape) - 1)
    replacement = ops.cast(replacement, value.dtype)
    return ops.where(ops.reshape(mask, shape), replacement, value)


def _no_targets(y):
    if y is not None:
        raise ValueError(
            "`y` must be None: the training targets (velocities) are made from "
            "the images inside the training step."
        )
