"""`StableDiffusion3Backbone`: CLIP-L, CLIP-G, optional T5, MMDiT and VAE."""

from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.models.backbone import Backbone
from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import CLIPTextEncoder
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.mmdit_lora import DEFAULT_LORA_TARGETS
from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
from keras_diffusion.models.stable_diffusion_3.vae import VAE


@register
class StableDiffusion3Backbone(Backbone):
    """The components of Stable Diffusion 3 / 3.5, and the step methods.

    The task composes these methods into the img2img recipe:
    `encode_text` -> `encode_image` -> `posterior_latents` -> (`add_noise`,
    `guided_velocity` per step) -> `decode`.

    Args:
        clip_l: dict of `CLIPTextEncoder` arguments (CLIP-L, quick_gelu).
        clip_g: dict of `CLIPTextEncoder` arguments (CLIP-G, gelu).
        mmdit: dict of `MMDiT` arguments.
        vae: dict of `VAE` arguments.
        t5: dict of `T5Encoder` arguments, or None to run without T5; then
            its `t5_sequence_length` tokens are zeros, as in diffusers.
        t5_sequence_length: number of T5 tokens in the context (256).
        scheduler_shift: the flow-matching sigma shift (3.0 for SD3).
        height, width: the native resolution, the default for `generate`.

    Examples:
    ```python
    backbone = keras_diffusion.models.StableDiffusion3Backbone.from_preset(
        "sd3_tiny_demo"
    )
    ```
    """

    # LoRA targets of `enable_lora`: the MMDiT attention projections.
    default_lora_targets = DEFAULT_LORA_TARGETS

    def __init__(
        self,
        clip_l,
        clip_g,
        mmdit,
        vae,
        t5=None,
        t5_sequence_length=256,
        scheduler_shift=3.0,
        height=1024,
        width=1024,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.clip_l_config = dict(clip_l)
        self.clip_g_config = dict(clip_g)
        self.mmdit_config = dict(mmdit)
        self.vae_config = dict(vae)
        self.t5_config = None if t5 is None else dict(t5)
        self.t5_sequence_length = int(t5_sequence_length)
        self.scheduler_shift = float(scheduler_shift)
        self.height = int(height)
        self.width = int(width)

        policy = self.dtype_policy
        self.clip_l = CLIPTextEncoder(**self.clip_l_config, name="clip_l", dtype=policy)
        self.clip_g = CLIPTextEncoder(**self.clip_g_config, name="clip_g", dtype=policy)
        self.t5 = None
        if self.t5_config is not None:
            self.t5 = T5Encoder(**self.t5_config, name="t5", dtype=policy)
        self.mmdit = MMDiT(**self.mmdit_config, name="mmdit", dtype=policy)
        self.vae = VAE(**self.vae_config, name="vae", dtype=policy)

        self.context_dim = self.mmdit.context_dim
        self.latent_channels = self.mmdit.latent_channels
        self.downsample_factor = 2 ** (len(self.vae.block_channels) - 1)
        clip_width = self.clip_l.embedding_dim + self.clip_g.embedding_dim
        if clip_width > self.context_dim:
            raise ValueError(
                f"CLIP-L + CLIP-G width ({clip_width}) exceeds the MMDiT context "
                f"dim ({self.context_dim})."
            )
        pooled = self.clip_l.projection_dim + self.clip_g.projection_dim
        if pooled != self.mmdit.pooled_dim:
            raise ValueError(
                f"CLIP pooled widths add up to {pooled}, but the MMDiT expects "
                f"pooled_dim={self.mmdit.pooled_dim}."
            )
        self._build_components()
        self.built = True

    @property
    def context_length(self):
        """Tokens in the context `encode_text` makes: CLIP's, then T5's."""
        return self.clip_l.max_sequence_length + self.t5_sequence_length

    def _build_components(self):
        self.clip_l.build((None, self.clip_l.max_sequence_length))
        self.clip_g.build((None, self.clip_g.max_sequence_length))
        if self.t5 is not None:
            self.t5.build((None, self.t5_sequence_length))
        f = self.downsample_factor
        self.vae.build((None, 8 * f, 8 * f, 3))
        self.mmdit.build(
            (None, 8, 8, self.latent_channels),
            (None, self.context_length, self.context_dim),
            (None, self.mmdit.pooled_dim),
            (None,),
        )

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model"):
        """A `LayoutMap` sharding the large weights over the model axis.

        The fused q/k/v, AdaLN modulation and first MLP kernels (and their
        biases) are split along their outputs, the attention output and
        second MLP kernels along their inputs, in both MMDiT streams and in
        the CLIP-L, CLIP-G and T5 encoder layers; the token and position
        tables along their width; the rest is replicated (see
        `keras_diffusion.models.stable_diffusion_3.distribution`). Pass it to
        `keras.distribution.ModelParallel`, set that distribution, then
        create or load the model.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`, e.g. of shape
                `(2, 4)` with axis names `("batch", "model")`.
            model_parallel_dim_name: the mesh axis to split kernels over.

        Examples:
        ```python
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            (1, len(devices)), ("batch", "model"), devices
        )
        layout_map = StableDiffusion3Backbone.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name="batch"
            )
        )
        task = keras_diffusion.models.ImageToImage.from_preset("sd3_tiny_demo")
        ```
        """
        from keras_diffusion.models.stable_diffusion_3 import distribution

        return distribution.layout_map(device_mesh, model_parallel_dim_name)

    # ------------------------------------------------------------ step methods
    def encode_text(self, clip_l_ids, clip_g_ids, t5_ids=None):
        """Token ids -> (context, pooled), exactly as diffusers builds them.

        The context is [CLIP-L ⊕ CLIP-G penultimate states, zero-padded to the
        context width ; T5 tokens (or zeros)]; pooled is CLIP-L ⊕ CLIP-G pooled.
        """
        clip_l = self.clip_l(clip_l_ids)
        clip_g = self.clip_g(clip_g_ids)
        clip_context = ops.concatenate(
            [clip_l["hidden_states"], clip_g["hidden_states"]], axis=-1
        )
        pad = self.context_dim - clip_context.shape[-1]
        clip_context = ops.pad(clip_context, [[0, 0], [0, 0], [0, pad]])
        batch = ops.shape(clip_l_ids)[0]
        if self.t5 is not None and t5_ids is not None:
            t5_context = ops.cast(self.t5(t5_ids), clip_context.dtype)
        else:
            t5_context = ops.zeros(
                (batch, self.t5_sequence_length, self.context_dim), clip_context.dtype
            )
        context = ops.concatenate([clip_context, t5_context], axis=1)
        pooled = ops.concatenate([clip_l["pooled"], clip_g["pooled"]], axis=-1)
        return context, pooled

    def collapse_context(self, context, t5_ran):
        """`(context, last_token_repeats)`, a zero T5 tail run as one token.

        Where T5 did not run (`t5_ran` False), `encode_text` ends the context
        in `t5_sequence_length` zero tokens. They stay identical through the
        MMDiT, so they are passed once, counted `last_token_repeats` times
        (`MMDiT`): the same velocity for less work. Any other context (T5's
        tokens, or a length other than `encode_text`'s) comes back whole,
        with 1.
        """
        zeros = 0 if t5_ran else self.t5_sequence_length
        if zeros <= 1 or context.shape[1] != self.context_length:
            return context, 1
        return context[:, : self.context_length - zeros + 1], zeros

    def encode_image(self, images):
        """Images in [-1, 1] -> VAE posterior (mean, log_variance)."""
        return self.vae.encode(images)

    def posterior_latents(self, mean, log_variance, noise):
        """Sample the posterior with the given noise, then shift and scale."""
        std = ops.exp(0.5 * ops.cast(log_variance, "float32"))
        z = ops.cast(mean, "float32") + std * ops.cast(noise, "float32")
        return self.vae.scale_latents(z)

    def guided_velocity(
        self,
        latents,
        context,
        pooled,
        sigma,
        guidance_scale,
        cfg,
        context_embedded=False,
        last_token_repeats=1,
    ):
        """One MMDiT evaluation at `sigma`, with classifier-free guidance.

        With `cfg`, `context`/`pooled` hold [negative; positive] halves and
        both run as one batch: v = v_neg + g·(v_pos − v_neg). A sampling loop
        passes `mmdit.embed_context(context)` once, with `context_embedded`,
        and a context whose identical zero tail is one token standing for
        `last_token_repeats` (see `MMDiT`).
        """
        x = ops.concatenate([latents, latents], axis=0) if cfg else latents
        batch = ops.shape(x)[0]
        timestep = ops.full((batch,), 1000.0, "float32") * ops.cast(sigma, "float32")
        x = ops.cast(x, self.compute_dtype)
        velocity = self.mmdit(
            x,
            context,
            pooled,
            timestep,
            context_embedded=context_embedded,
            last_token_repeats=last_token_repeats,
        )
        velocity = ops.cast(velocity, "float32")
        if not cfg:
            return velocity
        negative, positive = ops.split(velocity, 2, axis=0)
        return negative + ops.cast(guidance_scale, "float32") * (positive - negative)

    def decode(self, latents):
        """Scaled latents -> images in [-1, 1]."""
        z = self.vae.unscale_latents(ops.cast(latents, "float32"))
        return ops.cast(self.vae.decode(ops.cast(z, self.compute_dtype)), "float32")

    def get_config(self):
        return {
            **super().get_config(),
            "clip_l": self.clip_l_config,
            "clip_g": self.clip_g_config,
            "mmdit": self.mmdit_config,
            "vae": self.vae_config,
            "t5": self.t5_config,
            "t5_sequence_length": self.t5_sequence_length,
            "scheduler_shift": self.scheduler_shift,
            "height": self.height,
            "width": self.width,
        }
