"""Base class for image-to-image tasks, with the one generate pipeline."""

import sys

import keras
import numpy as np

from keras_diffusion.api_export import register
from keras_diffusion.models import generate_inputs as gi
from keras_diffusion.models.task import Task
from keras_diffusion.models.training import RectifiedFlowTraining
from keras_diffusion.utils.backend import compile_function

DEFAULT_SAMPLING = {"num_steps": 50, "guidance_scale": 7.0, "strength": 0.8}


def _is_dataset(inputs):
    return type(inputs).__module__.startswith("tensorflow") and hasattr(
        inputs, "as_numpy_iterator"
    )


def _is_prompt_like(value):
    return isinstance(value, str) or (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(v, str) for v in value)
    )


@register
class ImageToImage(RectifiedFlowTraining, Task):
    """Base class for image-to-image tasks.

    `generate()` is written once here and reads like a recipe: validate and
    normalise the inputs, draw the noise, tokenize and encode the prompts,
    encode the images, run the denoising loop, decode. Subclasses fill in the
    model-specific hooks: `latent_shape`, `schedule`, `encode_text`,
    `encode_image`, `denoise` and `decode`.

    `fit()` fine-tunes with the rectified-flow objective
    (`keras_diffusion.models.training`); subclasses fill in the training
    hooks `train_encode_images`, `train_encode_prompts`, `train_latents` and
    `train_velocity`. `precompute()` caches the frozen encoders' outputs.

    Args:
        backbone: a `Backbone`.
        preprocessor: a `Preprocessor`, or None.
        sampling: optional dict of defaults for `generate`: `num_steps`,
            `guidance_scale`, `strength`, `height`, `width`.
        timestep_sampling: "logit_normal" (default) or "uniform": how `fit`
            draws `t`.
        logit_mean, logit_std: the logit-normal's parameters (0 and 1).
        prompt_dropout: probability that `fit` replaces a prompt by "" (0.1).
        trainable_components: names of the backbone components `fit`
            trains (the others are frozen); None takes the subclass default
            (SD3: `("mmdit",)`).
        seed: optional int seeding `fit`'s random draws.

    Examples:
    ```python
    task = keras_diffusion.models.ImageToImage.from_preset("sd3_tiny_demo")
    image = np.zeros((64, 64, 3), dtype="uint8")
    task.generate(image, "a red circle on a blue background", seed=0)

    task.compile()  # AdamW(1e-4), MSE loss
    images = np.zeros((2, 64, 64, 3), dtype="uint8")
    task.fit({"images": images, "prompts": ["a red circle", ""]}, batch_size=2)
    ```
    """

    resolution_multiple = 16

    def __init__(
        self,
        backbone,
        preprocessor=None,
        sampling=None,
        timestep_sampling="logit_normal",
        logit_mean=0.0,
        logit_std=1.0,
        prompt_dropout=0.1,
        trainable_components=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(backbone, preprocessor, **kwargs)
        self.sampling = dict(sampling or {})
        self._compiled = {}
        self._compiled_signature = None
        self._init_training(
            timestep_sampling,
            logit_mean,
            logit_std,
            prompt_dropout,
            trainable_components,
            seed,
        )

    def task_config(self):
        return {
            **super().task_config(),
            "sampling": dict(self.sampling),
            **self.training_config(),
        }

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        metrics="auto",
        timestep_sampling=None,
        prompt_dropout=None,
        **kwargs,
    ):
        """Configure training; "auto" picks AdamW, an MSE loss and an MSE metric.

        The "auto" optimizer is AdamW(learning_rate=1e-4, weight_decay=1e-2,
        epsilon=1e-8, clipnorm=1.0). Any argument overrides its default.
        `timestep_sampling` and `prompt_dropout`, when given, replace the
        task's settings (see the class arguments).
        """
        self._set_training_options(timestep_sampling, prompt_dropout)
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(
                learning_rate=1e-4, weight_decay=1e-2, epsilon=1e-8, clipnorm=1.0
            )
        if loss == "auto":
            loss = keras.losses.MeanSquaredError()
        if metrics == "auto":
            metrics = [keras.metrics.MeanSquaredError()]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def _function(self, key, fn, rewrite_passes=1, trace_on_tensorflow=True):
        """`fn` compiled once per key (and per set of backbone variables).

        Enabling or merging LoRA changes the backbone's variables; the
        functions compiled for the old set are then dropped.
        `rewrite_passes`, `trace_on_tensorflow`: see `compile_function`.
        """
        signature = hash(tuple(id(v) for v in self.backbone.variables))
        if signature != self._compiled_signature:
            self._compiled.clear()
            self._compiled_signature = signature
        if key not in self._compiled:
            self._compiled[key] = compile_function(
                fn,
                self.backbone.variables,
                rewrite_passes=rewrite_passes,
                trace_on_tensorflow=trace_on_tensorflow,
            )
        return self._compiled[key]

    # ------------------------------------------------------------------ hooks
    def default_resolution(self):
        """(height, width) used when neither the call nor `sampling` sets one."""
        raise NotImplementedError  # abstract hook

    def latent_shape(self, height, width):
        """Shape of one latent, without batch, for an image of this size."""
        raise NotImplementedError  # abstract hook

    def schedule(self, num_steps, strength):
        """Return `(sigmas, start_index)` for this call."""
        raise NotImplementedError  # abstract hook

    def encode_text(self, prompts, negative_prompts, use_guidance):
        """Prompts -> the conditioning the denoiser needs."""
        raise NotImplementedError  # abstract hook

    def encode_image(self, images, posterior_noise):
        """Float images in [-1, 1] -> clean latents x0."""
        raise NotImplementedError  # abstract hook

    def denoise(self, latents, noise, conditioning, sigmas, start_index, settings):
        """Noise x0 to `sigmas[start_index]`, then run the sampler to the end."""
        raise NotImplementedError  # abstract hook

    def decode(self, latents):
        """Latents -> float images in [-1, 1]."""
        raise NotImplementedError  # abstract hook

    # --------------------------------------------------------------- generate
    def generate(self, inputs, *args, **kwargs):
        """Generate images from reference images and prompts.

        Signature: `generate(inputs, num_steps=None, guidance_scale=None,
        strength=None, seed=None, **options)`, plus the shorthand
        `generate(image, "a prompt", ...)` where the prompt directly follows
        the image. Arguments left as None take the preset's sampling defaults.

        Args:
            inputs: a dict with "images", "prompts" and optional
                "negative_prompts"; a `tf.data.Dataset` of such dicts; or an
                image (array or PIL) followed by a prompt string. Images are
                float in [-1, 1], uint8 in [0, 255], or PIL images.
            num_steps: int, the number of steps of the full schedule.
            guidance_scale: float; classifier-free guidance is off when <= 1.
            strength: float in [0, 1]; how much of the schedule is run.
            seed: optional int seeding all the noise of the call.
            **options: `height`, `width` (multiples of 16), `noise` and
                `posterior_noise` (arrays of the latent batch shape, replacing
                the drawn noise), `verbose` (a progress bar; on by default in
                interactive use) and `callback` (called as
                `callback(step, num_steps, latents)`).

        Returns:
            uint8 images of shape (batch, height, width, 3), or
            (height, width, 3) for an unbatched input.
        """
        if (
            args
            and not isinstance(inputs, dict)
            and not _is_dataset(inputs)
            and _is_prompt_like(args[0])
        ):
            inputs, args = {"images": inputs, "prompts": args[0]}, args[1:]
        return self._generate(inputs, *args, **kwargs)

    def _generate(
        self,
        inputs,
        num_steps=None,
        guidance_scale=None,
        strength=None,
        seed=None,
        **options,
    ):
        settings = self._settings(num_steps, guidance_scale, strength, seed, options)
        rng = np.random.default_rng(settings.seed)
        if _is_dataset(inputs):
            return self._generate_dataset(inputs, settings, rng)
        batch, unbatched = gi.normalize_inputs(inputs)
        images = self._generate_batch(batch, settings, rng)
        return images[0] if unbatched else images

    def _settings(self, num_steps, guidance_scale, strength, seed, options):
        unknown = sorted(set(options) - set(gi.OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"Unknown generate option(s) {unknown}; accepted: "
                f"{list(gi.OPTION_NAMES)}."
            )
        defaults = {**DEFAULT_SAMPLING, **self.sampling}
        pick = lambda value, key: defaults[key] if value is None else value  # noqa: E731
        height, width = self.default_resolution()
        height = options.get("height", defaults.get("height", height))
        width = options.get("width", defaults.get("width", width))
        callback = options.get("callback")
        verbose = options.get("verbose")
        if callback is not None and not callable(callback):
            raise TypeError(f"`callback` must be callable; got {callback!r}.")
        if seed is not None:
            seed = gi.check_int(seed, "seed", 0)
        return gi.GenerateSettings(
            num_steps=gi.check_int(pick(num_steps, "num_steps"), "num_steps", 1),
            guidance_scale=gi.check_float(
                pick(guidance_scale, "guidance_scale"), "guidance_scale"
            ),
            strength=gi.check_float(pick(strength, "strength"), "strength", 0.0, 1.0),
            seed=seed,
            height=gi.check_size(height, "height", self.resolution_multiple),
            width=gi.check_size(width, "width", self.resolution_multiple),
            noise=options.get("noise"),
            posterior_noise=options.get("posterior_noise"),
            verbose=_interactive() if verbose is None else bool(verbose),
            callback=callback,
        )

    def _generate_batch(self, batch, settings, rng):
        images = self.resize_images(batch["images"], settings.height, settings.width)
        shape = (images.shape[0], *self.latent_shape(settings.height, settings.width))
        posterior_noise = gi.check_noise(
            settings.posterior_noise, "posterior_noise", shape
        )
        noise = gi.check_noise(settings.noise, "noise", shape)
        # Draw in a fixed order so a seed always means the same noise.
        drawn_posterior = rng.standard_normal(shape, dtype=np.float32)
        drawn_noise = rng.standard_normal(shape, dtype=np.float32)
        posterior_noise = (
            drawn_posterior if posterior_noise is None else posterior_noise
        )
        noise = drawn_noise if noise is None else noise
        sigmas, start_index = self.schedule(settings.num_steps, settings.strength)
        conditioning = self.encode_text(
            batch["prompts"], batch["negative_prompts"], settings.use_guidance
        )
        latents = self.encode_image(images, posterior_noise)
        latents = self.denoise(
            latents, noise, conditioning, sigmas, start_index, settings
        )
        return gi.to_uint8(keras.ops.convert_to_numpy(self.decode(latents)))

    def _generate_dataset(self, dataset, settings, rng):
        if settings.noise is not None or settings.posterior_noise is not None:
            raise ValueError(
                "`noise` and `posterior_noise` cannot be combined with a "
                "tf.data.Dataset input; pass a dict of arrays instead."
            )
        spec = dataset.element_spec
        if not isinstance(spec, dict):
            raise TypeError(
                "A tf.data.Dataset passed to `generate` must yield dicts with keys "
                f"{list(gi.INPUT_KEYS)}; it yields {type(spec).__name__}."
            )
        missing = [k for k in ("images", "prompts") if k not in spec]
        unknown = sorted(set(spec) - set(gi.INPUT_KEYS))
        if missing or unknown:
            raise ValueError(
                f"The dataset's elements must have keys 'images' and 'prompts' (and "
                f"optionally 'negative_prompts'); missing {missing}, unknown {unknown}."
            )
        outputs = []
        for element in dataset.as_numpy_iterator():
            element = {k: _decode_strings(v) for k, v in element.items()}
            batch, _ = gi.normalize_inputs(element)
            outputs.append(self._generate_batch(batch, settings, rng))
        if not outputs:
            raise ValueError("The tf.data.Dataset passed to `generate` is empty.")
        return np.concatenate(outputs, axis=0)

    def resize_images(self, images, height, width):
        """Resize float images to (height, width) when they differ."""
        if images.shape[1:3] == (height, width):
            return images
        resized = keras.ops.image.resize(
            images, (height, width), interpolation="bicubic", antialias=True
        )
        return np.clip(keras.ops.convert_to_numpy(resized), -1.0, 1.0)


def _interactive():
    """Progress bars default on in a notebook or terminal, off in scripts' logs."""
    return hasattr(sys, "ps1") or "ipykernel" in sys.modules or sys.stdout.isatty()


def _decode_strings(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [
            v.decode("utf-8") if isinstance(v, bytes) else v for v in value.tolist()
        ]
    return value
