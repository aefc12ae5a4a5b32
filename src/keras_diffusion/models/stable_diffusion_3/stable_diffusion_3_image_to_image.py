"""`StableDiffusion3ImageToImage`: the SD3 hooks of the base generate recipe."""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.models import generate_inputs as gi
from keras_diffusion.models.image_to_image import ImageToImage
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (
    StableDiffusion3Backbone,
)
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_preprocessor import (
    StableDiffusion3Preprocessor,
)
from keras_diffusion.samplers import flow_match
from keras_diffusion.utils.backend import (
    active_distribution,
    data_parallel_size,
    distribute_batch,
    lay_out_variables,
    sequential_fori_loop,
)

# Sigmas are padded to a multiple of this, so a new `num_steps` reuses the
# compiled loop instead of tracing a new one.
SIGMA_BUCKET = 64


@register
class StableDiffusion3ImageToImage(ImageToImage):
    """Image-to-image with Stable Diffusion 3 / 3.5.

    Runs diffusers' `StableDiffusion3Img2ImgPipeline` recipe: the VAE posterior
    is sampled, shifted and scaled; it is noised to the strength-truncated
    start of the flow-matching schedule; Euler steps with classifier-free
    guidance (negative and positive halves as one batch) run to sigma 0; the
    result is decoded. Every per-call value (sigmas, step range, guidance,
    batch, resolution) is an argument of the compiled functions.

    On jax, `generate` follows `keras.distribution`: under `DataParallel`
    or `ModelParallel` the batch (images, noise, text embeddings, latents)
    is split over the mesh's "batch" axis, padded with copies of its last
    item when it does not divide evenly, and the weights stay where the
    distribution put them (see `StableDiffusion3Backbone.get_layout_map`).

    Args:
        backbone: a `StableDiffusion3Backbone`.
        preprocessor: a `StableDiffusion3Preprocessor`.
        sampling: optional generate defaults (see `ImageToImage`).

    Examples:
    ```python
    task = keras_diffusion.models.ImageToImage.from_preset("sd3_tiny_demo")
    image = np.zeros((64, 64, 3), dtype="uint8")
    out = task.generate(image, "a red circle on a blue background", seed=0)
    ```
    """

    backbone_cls = StableDiffusion3Backbone
    preprocessor_cls = StableDiffusion3Preprocessor

    default_trainable_components = ("mmdit",)

    def _generate_batch(self, batch, settings, rng):
        if active_distribution() is None:
            return super()._generate_batch(batch, settings, rng)
        lay_out_variables(self.backbone.variables)
        size = len(batch["prompts"])
        split = data_parallel_size()
        padded = split * math.ceil(size / split)
        if padded == size:
            return super()._generate_batch(batch, settings, rng)
        # Draw the noise as the base class does (same order, same shape), so
        # a seed means the same images however many devices run them.
        shape = (size, *self.latent_shape(settings.height, settings.width))
        noises = {}
        for name in ("posterior_noise", "noise"):
            given = gi.check_noise(getattr(settings, name), name, shape)
            drawn = rng.standard_normal(shape, dtype=np.float32)
            noises[name] = _pad_rows(drawn if given is None else given, padded)
        batch = {key: _pad_rows(value, padded) for key, value in batch.items()}
        settings = dataclasses.replace(settings, **noises)
        images = super()._generate_batch(batch, settings, np.random.default_rng(0))
        return images[:size]

    # ------------------------------------------------------------------ hooks
    def default_resolution(self):
        return (self.backbone.height, self.backbone.width)

    def latent_shape(self, height, width):
        f = self.backbone.downsample_factor
        return (height // f, width // f, self.backbone.latent_channels)

    def schedule(self, num_steps, strength):
        sigmas = flow_match.sigmas(num_steps, shift=self.backbone.scheduler_shift)
        return sigmas, flow_match.start_index(num_steps, strength)

    def encode_text(self, prompts, negative_prompts, use_guidance):
        if self.preprocessor is None:
            raise ValueError("This task has no preprocessor; it cannot read prompts.")
        texts = list(negative_prompts) + list(prompts) if use_guidance else prompts
        ids = self.preprocessor.generate_preprocess(texts)
        has_t5 = "t5" in ids and self.backbone.t5 is not None
        # Eager on tensorflow: a trace costs a first call more than it saves.
        encode = self._function(
            ("encode_text", has_t5),
            lambda *args: self.backbone.encode_text(*args),
            trace_on_tensorflow=False,
        )
        args = [ids["clip_l"], ids["clip_g"]] + ([ids["t5"]] if has_t5 else [])
        context, pooled = encode(*[distribute_batch(a) for a in args])
        context, repeats = self.backbone.collapse_context(context, has_t5)
        return {
            "context": context,
            "pooled": pooled,
            "cfg": use_guidance,
            "last_token_repeats": repeats,
        }

    def encode_image(self, images, posterior_noise):
        def fn(images, noise):
            mean, log_variance = self.backbone.encode_image(images)
            return self.backbone.posterior_latents(mean, log_variance, noise)

        return self._function(("encode_image",), fn)(
            distribute_batch(
                ops.convert_to_tensor(images, self.backbone.compute_dtype)
            ),
            distribute_batch(ops.convert_to_tensor(posterior_noise, "float32")),
        )

    def denoise(self, latents, noise, conditioning, sigmas, start_index, settings):
        num_steps = len(sigmas) - 1
        padded = np.zeros(
            SIGMA_BUCKET * math.ceil(len(sigmas) / SIGMA_BUCKET), "float32"
        )
        padded[: len(sigmas)] = sigmas
        cfg = conditioning["cfg"]
        repeats = conditioning["last_token_repeats"]
        args = dict(
            context=distribute_batch(conditioning["context"]),
            pooled=distribute_batch(conditioning["pooled"]),
            sigmas=ops.convert_to_tensor(padded),
            guidance=ops.convert_to_tensor(np.float32(settings.guidance_scale)),
        )
        latents = distribute_batch(latents)
        noise = distribute_batch(ops.convert_to_tensor(noise, "float32"))
        if settings.verbose or settings.callback is not None:
            return self._denoise_stepwise(
                latents, noise, start_index, num_steps, (cfg, repeats), args, settings
            )
        # The MMDiT gains from grappler's second round (`compile_function`).
        loop = self._function(
            ("denoise_loop", cfg, repeats),
            self._loop_fn(cfg, repeats),
            rewrite_passes=2,
        )
        return loop(
            latents,
            noise,
            args["context"],
            args["pooled"],
            args["sigmas"],
            ops.convert_to_tensor(np.int32(start_index)),
            ops.convert_to_tensor(np.int32(num_steps)),
            args["guidance"],
        )

    def _loop_fn(self, cfg, repeats):
        backbone = self.backbone
        options = dict(context_embedded=True, last_token_repeats=repeats)

        def loop(x0, noise, context, pooled, sigmas, start, end, guidance):
            x = flow_match.add_noise(x0, noise, ops.take(sigmas, start))
            tokens = backbone.mmdit.embed_context(context)  # once, not per step

            def body(i, x):
                sigma = ops.take(sigmas, i)
                sigma_next = ops.take(sigmas, i + 1)
                v = backbone.guided_velocity(
                    x, tokens, pooled, sigma, guidance, cfg, **options
                )
                return flow_match.euler_step(x, v, sigma, sigma_next)

            return sequential_fori_loop(start, end, body, x)

        return loop

    def _denoise_stepwise(self, latents, noise, start, num_steps, key, args, settings):
        backbone = self.backbone
        cfg, repeats = key

        def step(x, context, pooled, sigma, sigma_next, guidance):
            v = backbone.guided_velocity(
                x, context, pooled, sigma, guidance, cfg, last_token_repeats=repeats
            )
            return flow_match.euler_step(x, v, sigma, sigma_next)

        step_fn = self._function(("denoise_step", cfg, repeats), step, rewrite_passes=2)
        sigmas = args["sigmas"]
        x = flow_match.add_noise(latents, noise, ops.take(sigmas, start))
        progress = keras.utils.Progbar(num_steps - start) if settings.verbose else None
        for n, i in enumerate(range(start, num_steps)):
            x = step_fn(
                x,
                args["context"],
                args["pooled"],
                ops.take(sigmas, i),
                ops.take(sigmas, i + 1),
                args["guidance"],
            )
            if progress is not None:
                progress.update(n + 1)
            if settings.callback is not None:
                settings.callback(i + 1, num_steps, x)
        return x

    # --------------------------------------------------------- training hooks
    def train_encode_images(self, images):
        return self.backbone.encode_image(ops.cast(images, self.backbone.compute_dtype))

    def train_encode_prompts(self, token_ids):
        context, pooled = self.backbone.encode_text(
            token_ids["clip_l"], token_ids["clip_g"], token_ids.get("t5")
        )
        return {"context": context, "pooled": pooled}

    def train_latents(self, mean, log_variance, noise):
        return self.backbone.posterior_latents(mean, log_variance, noise)

    def train_velocity(self, latents, t, conditioning):
        context = ops.cast(conditioning["context"], self.backbone.compute_dtype)
        pooled = ops.cast(conditioning["pooled"], self.backbone.compute_dtype)
        # A backbone without T5 only makes contexts with a zero T5 tail
        # (`encode_text`, `precompute`): train on it as one token, as
        # `generate` runs it (the same velocity and gradients, less work).
        context, repeats = self.backbone.collapse_context(
            context, t5_ran=self.backbone.t5 is not None
        )
        return self.backbone.guided_velocity(
            latents, context, pooled, t, 1.0, False, last_token_repeats=repeats
        )

    def decode(self, latents):
        return self._function(("decode",), self.backbone.decode)(
            distribute_batch(latents)
        )


def _pad_rows(value, size):
    """Repeat the last item of `value` (array or list) up to `size` items."""
    missing = size - len(value)
    if isinstance(value, list):
        return value + value[-1:] * missing
    return np.concatenate([value, np.repeat(value[-1:], missing, axis=0)], axis=0)
