"""The Stable Diffusion 3 VAE: a KL autoencoder with 16 latent channels.

Same function as diffusers' `AutoencoderKL` with SD3's configuration,
channels last: images `(B, H, W, 3)` in [-1, 1] map to latents
`(B, H / 2**(n-1), W / 2**(n-1), latent_channels)` for `n` blocks
(`H / 8` for SD3's four).
"""

import keras
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.models.stable_diffusion_3.vae_blocks import (
    Downsample,
    GroupNorm,
    MidBlock,
    ResnetBlock,
    Upsample,
)
from keras_diffusion.utils.fast_conv import conv2d
from keras_diffusion.utils.fast_elementwise import silu

LOG_VARIANCE_RANGE = (-30.0, 20.0)


def _conv(filters, kernel_size, name, dtype):
    return keras.layers.Conv2D(
        filters, kernel_size, padding="same", name=name, dtype=dtype
    )


def _shape(channels):
    return (None, None, None, channels)


@register
class VAEEncoder(keras.layers.Layer):
    """Images to the posterior's moments, `(B, h, w, 2 * latent_channels)`.

    The first `latent_channels` outputs are the mean, the rest the (not yet
    clamped) log-variance. Block `i` holds `layers_per_block` residual blocks
    at `block_channels[i]` channels and, except the last, a stride-2
    downsampling conv.

    Args:
        block_channels: tuple of int, channels of each resolution level.
        layers_per_block: int, residual blocks per level.
        latent_channels: int, channels of the latent.
        norm_groups: int, groups of every group norm.
        norm_epsilon: float, epsilon of every group norm.
        use_quant_conv: bool, whether a 1x1 conv follows the output.

    Examples:

    >>> import numpy as np
    >>> encoder = VAEEncoder(block_channels=(8, 16), norm_groups=4)
    >>> tuple(encoder(np.zeros((1, 16, 16, 3), "float32")).shape)
    (1, 8, 8, 32)
    """

    def __init__(
        self,
        block_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_groups=32,
        norm_epsilon=1e-6,
        use_quant_conv=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.block_channels = tuple(block_channels)
        self.layers_per_block = layers_per_block
        self.latent_channels = latent_channels
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        self.use_quant_conv = use_quant_conv
        dtype = self.dtype_policy
        norm = dict(norm_groups=norm_groups, norm_epsilon=norm_epsilon, dtype=dtype)

        self.conv_in = _conv(self.block_channels[0], 3, "conv_in", dtype)
        # Level i: `down_resnets[i]`, then `downsamplers[i]` (all but the last).
        down_resnets, downsamplers = [], []
        channels = self.block_channels[0]
        for i, out in enumerate(self.block_channels):
            level = []
            for j in range(layers_per_block):
                name = f"down_{i}_resnet_{j}"
                level.append(ResnetBlock(channels, out, name=name, **norm))
                channels = out
            down_resnets.append(level)
            if i < len(self.block_channels) - 1:
                name = f"down_{i}_downsample"
                downsamplers.append(Downsample(out, name=name, dtype=dtype))
        self.down_resnets = down_resnets
        self.downsamplers = downsamplers
        self.mid_block = MidBlock(channels, name="mid_block", **norm)
        self.norm_out = GroupNorm(norm_groups, norm_epsilon, name="norm_out")
        self.conv_out = _conv(2 * latent_channels, 3, "conv_out", dtype)
        self.quant_conv = None
        if use_quant_conv:
            self.quant_conv = _conv(2 * latent_channels, 1, "quant_conv", dtype)

    def build(self, input_shape=None):
        self.conv_in.build(_shape(3 if input_shape is None else input_shape[-1]))
        for layer in [*sum(self.down_resnets, []), *self.downsamplers]:
            layer.build()
        self.mid_block.build()
        self.norm_out.build(_shape(self.block_channels[-1]))
        self.conv_out.build(_shape(self.block_channels[-1]))
        if self.quant_conv is not None:
            self.quant_conv.build(_shape(2 * self.latent_channels))

    def call(self, images):
        x = conv2d(self.conv_in, images)
        for i, level in enumerate(self.down_resnets):
            for resnet in level:
                x = resnet(x)
            if i < len(self.downsamplers):
                x = self.downsamplers[i](x)
        x = self.mid_block(x)
        x = conv2d(self.conv_out, silu(self.norm_out(x), overwrite=True))
        if self.quant_conv is not None:
            x = conv2d(self.quant_conv, x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_channels": list(self.block_channels),
                "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
                "use_quant_conv": self.use_quant_conv,
            }
        )
        return config


@register
class VAEDecoder(keras.layers.Layer):
    """Latents `(B, h, w, latent_channels)` to images `(B, H, W, 3)`.

    Mirrors the encoder: levels run from `block_channels[-1]` down to
    `block_channels[0]`, each with `layers_per_block` residual blocks and,
    except the last, a nearest-neighbour 2x upsampling followed by a conv.

    Args:
        block_channels: tuple of int, channels of each resolution level, in
            the encoder's order (the decoder walks it in reverse).
        layers_per_block: int, residual blocks per level (SD3: 3).
        latent_channels: int, channels of the latent.
        norm_groups: int, groups of every group norm.
        norm_epsilon: float, epsilon of every group norm.
        use_post_quant_conv: bool, whether a 1x1 conv precedes the decoder.
        image_channels: int, channels of the output image.

    Examples:

    >>> import numpy as np
    >>> decoder = VAEDecoder(block_channels=(8, 16), norm_groups=4)
    >>> tuple(decoder(np.zeros((1, 8, 8, 16), "float32")).shape)
    (1, 16, 16, 3)
    """

    def __init__(
        self,
        block_channels=(128, 256, 512, 512),
        layers_per_block=3,
        latent_channels=16,
        norm_groups=32,
        norm_epsilon=1e-6,
        use_post_quant_conv=False,
        image_channels=3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.block_channels = tuple(block_channels)
        self.layers_per_block = layers_per_block
        self.latent_channels = latent_channels
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        self.use_post_quant_conv = use_post_quant_conv
        self.image_channels = image_channels
        dtype = self.dtype_policy
        norm = dict(norm_groups=norm_groups, norm_epsilon=norm_epsilon, dtype=dtype)

        self.post_quant_conv = None
        if use_post_quant_conv:
            self.post_quant_conv = _conv(latent_channels, 1, "post_quant_conv", dtype)
        channels = self.block_channels[-1]
        self.conv_in = _conv(channels, 3, "conv_in", dtype)
        self.mid_block = MidBlock(channels, name="mid_block", **norm)
        # Level i: `up_resnets[i]`, then `upsamplers[i]` (all but the last).
        up_resnets, upsamplers = [], []
        for i, out in enumerate(reversed(self.block_channels)):
            level = []
            for j in range(layers_per_block):
                name = f"up_{i}_resnet_{j}"
                level.append(ResnetBlock(channels, out, name=name, **norm))
                channels = out
            up_resnets.append(level)
            if i < len(self.block_channels) - 1:
                upsamplers.append(Upsample(out, name=f"up_{i}_upsample", dtype=dtype))
        self.up_resnets = up_resnets
        self.upsamplers = upsamplers
        self.norm_out = GroupNorm(norm_groups, norm_epsilon, name="norm_out")
        self.conv_out = _conv(image_channels, 3, "conv_out", dtype)

    def build(self, input_shape=None):
        if self.post_quant_conv is not None:
            self.post_quant_conv.build(_shape(self.latent_channels))
        self.conv_in.build(_shape(self.latent_channels))
        self.mid_block.build()
        for layer in [*sum(self.up_resnets, []), *self.upsamplers]:
            layer.build()
        self.norm_out.build(_shape(self.block_channels[0]))
        self.conv_out.build(_shape(self.block_channels[0]))

    def call(self, latents):
        x = latents
        if self.post_quant_conv is not None:
            x = conv2d(self.post_quant_conv, x)
        x = self.mid_block(conv2d(self.conv_in, x))
        for i, level in enumerate(self.up_resnets):
            for resnet in level:
                x = resnet(x)
            if i < len(self.upsamplers):
                x = self.upsamplers[i](x)
        return conv2d(self.conv_out, silu(self.norm_out(x), overwrite=True))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_channels": list(self.block_channels),
                "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
                "use_post_quant_conv": self.use_post_quant_conv,
                "image_channels": self.image_channels,
            }
        )
        return config


@register
class VAE(keras.layers.Layer):
    """The SD3 autoencoder: `encode`, `decode` and latent (un)scaling.

    Calling the layer reconstructs images through the posterior mean.

    Args:
        block_channels: tuple of int, channels of each resolution level.
        encoder_layers_per_block: int, residual blocks per encoder level
            (diffusers' `layers_per_block`).
        decoder_layers_per_block: int, residual blocks per decoder level
            (diffusers' `layers_per_block + 1`).
        latent_channels: int, channels of the latent.
        norm_groups: int, groups of every group norm.
        norm_epsilon: float, epsilon of every group norm.
        scaling_factor: float, the latent scale (SD3: 1.5305).
        shift_factor: float, the latent shift (SD3: 0.0609).
        use_quant_conv: bool, 1x1 conv after the encoder.
        use_post_quant_conv: bool, 1x1 conv before the decoder.

    Examples:

    >>> import numpy as np
    >>> vae = VAE(block_channels=(8, 16), norm_groups=4)
    >>> mean, log_variance = vae.encode(np.zeros((1, 16, 24, 3), "float32"))
    >>> tuple(mean.shape)
    (1, 8, 12, 16)
    >>> tuple(vae.decode(vae.scale_latents(mean) * 0).shape)
    (1, 16, 24, 3)
    """

    def __init__(
        self,
        block_channels=(128, 256, 512, 512),
        encoder_layers_per_block=2,
        decoder_layers_per_block=3,
        latent_channels=16,
        norm_groups=32,
        norm_epsilon=1e-6,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.block_channels = tuple(block_channels)
        self.encoder_layers_per_block = encoder_layers_per_block
        self.decoder_layers_per_block = decoder_layers_per_block
        self.latent_channels = latent_channels
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.use_quant_conv = use_quant_conv
        self.use_post_quant_conv = use_post_quant_conv
        common = dict(
            block_channels=self.block_channels,
            latent_channels=latent_channels,
            norm_groups=norm_groups,
            norm_epsilon=norm_epsilon,
            dtype=self.dtype_policy,
        )
        self.encoder = VAEEncoder(
            layers_per_block=encoder_layers_per_block,
            use_quant_conv=use_quant_conv,
            name="encoder",
            **common,
        )
        self.decoder = VAEDecoder(
            layers_per_block=decoder_layers_per_block,
            use_post_quant_conv=use_post_quant_conv,
            name="decoder",
            **common,
        )

    def build(self, input_shape=None):
        self.encoder.build(input_shape)
        self.decoder.build()
        self.built = True

    def _ensure_built(self):
        if not self.built:
            self.build()

    def encode(self, images):
        """Posterior `(mean, log_variance)` of the latents of `images`.

        The log-variance is clamped to [-30, 20], as diffusers does.
        """
        self._ensure_built()
        moments = self.encoder(images)
        mean = moments[..., : self.latent_channels]
        log_variance = ops.clip(
            moments[..., self.latent_channels :], *LOG_VARIANCE_RANGE
        )
        return mean, log_variance

    def decode(self, latents):
        """Images from (unscaled) latents."""
        self._ensure_built()
        return self.decoder(latents)

    def scale_latents(self, latents):
        """VAE latents to the diffusion model's space: `(z - shift) * scale`."""
        return (latents - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, latents):
        """Diffusion-space latents back to the VAE's: `x / scale + shift`."""
        return latents / self.scaling_factor + self.shift_factor

    def call(self, images):
        mean, _ = self.encode(images)
        return self.decode(mean)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "block_channels": list(self.block_channels),
                "encoder_layers_per_block": self.encoder_layers_per_block,
                "decoder_layers_per_block": self.decoder_layers_per_block,
                "latent_channels": self.latent_channels,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "use_quant_conv": self.use_quant_conv,
                "use_post_quant_conv": self.use_post_quant_conv,
            }
        )
        return config
