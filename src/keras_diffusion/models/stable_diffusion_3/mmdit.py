"""The MMDiT denoiser of Stable Diffusion 3 and MMDiT-X of SD3.5-medium.

Numerically matches diffusers' `SD3Transformer2DModel` (channels last):
patchify with a strided conv, add a centre-cropped 2-D sin-cos position
table, embed `timestep` and the pooled text embedding into `temb`, run the
joint blocks over image and text tokens, then a final continuous AdaLN
(scale before shift), a linear projection and unpatchify.
"""

import keras
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.models.stable_diffusion_3.mmdit_blocks import (
    TIMESTEP_CHANNELS,
    MMDiTBlock,
    Modulation,
    norm_modulate,
    timestep_embedding,
)
from keras_diffusion.utils.fast_elementwise import silu
from keras_diffusion.utils.fast_ops import call_layer, chunks, linear
from keras_diffusion.utils.shared_traces import layer_caller


@register
class MMDiT(keras.layers.Layer):
    """SD3 / SD3.5 multimodal diffusion transformer (velocity predictor).

    `call(latents, context, pooled, timestep)` takes latents
    `(B, h, w, latent_channels)` with `h` and `w` multiples of `patch_size`
    and at most `patch_size * position_size`, text embeddings
    `(B, L, context_dim)`, pooled text embeddings `(B, pooled_dim)` and raw
    timesteps `(B,)` in `[0, 1000]` (`1000 * sigma`; a scalar is broadcast),
    and returns the predicted velocity `(B, h, w, latent_channels)` in the
    compute dtype.

    The position table `(position_size, position_size, hidden_dim)` is a
    non-trainable weight, zero until loaded from a checkpoint (diffusers'
    `pos_embed.pos_embed` buffer); it is cropped around its centre to the
    latent's patch grid.

    Identical trailing text tokens (the zeros that stand in for T5 in a
    model without it) stay identical through every block, so they can be
    passed once: `last_token_repeats=n` counts the context's last token as
    `n` copies, which attention weighs by `log(n)`. The output is the same
    as with the `n` tokens, for a fraction of the text stream's work.

    Precision: the token streams are carried in float32; the projections run
    in the compute dtype; norms, softmax, the timestep and pooled embedding
    MLPs and the AdaLN modulation run in float32 (the modulation weights are
    stored in the policy's variable dtype and upcast). Inputs are not
    autocast, so the timestep reaches the sinusoidal embedding in float32.

    Args:
        hidden_dim: int. Token width (diffusers: `num_attention_heads *
            attention_head_dim`, also `caption_projection_dim`).
        num_layers: int. Number of joint blocks; the last one is
            context-pre-only.
        num_heads: int. Attention heads; `hidden_dim / num_heads` is the
            head width.
        position_size: int. Side of the position table in patches
            (diffusers `pos_embed_max_size`).
        patch_size: int. Side of a latent patch.
        latent_channels: int. Latent channels in and out.
        context_dim: int. Width of the text embeddings
            (`joint_attention_dim`).
        pooled_dim: int. Width of the pooled text embedding
            (`pooled_projection_dim`).
        qk_norm: `None` (SD3) or `"rms_norm"` (SD3.5).
        dual_attention_layers: tuple of block indices that get the MMDiT-X
            image-only second attention (SD3.5-medium: 0..12).
        mlp_ratio: int. MLP width multiplier.

    Examples:

    >>> import numpy as np
    >>> model = MMDiT(
    ...     hidden_dim=32, num_layers=2, num_heads=4, position_size=8,
    ...     context_dim=24, pooled_dim=20, qk_norm="rms_norm",
    ...     dual_attention_layers=(0,),
    ... )
    >>> velocity = model(
    ...     np.zeros((2, 8, 12, 16), "float32"),
    ...     np.zeros((2, 7, 24), "float32"),
    ...     np.zeros((2, 20), "float32"),
    ...     np.array([997.5, 300.0], "float32"),
    ... )
    >>> tuple(velocity.shape)
    (2, 8, 12, 16)
    """

    def __init__(
        self,
        hidden_dim,
        num_layers,
        num_heads,
        position_size,
        patch_size=2,
        latent_channels=16,
        context_dim=4096,
        pooled_dim=2048,
        qk_norm=None,
        dual_attention_layers=(),
        mlp_ratio=4,
        **kwargs,
    ):
        # The timestep must reach the sinusoidal embedding in float32 (997.5
        # is not representable in bfloat16), so inputs are not autocast.
        super().__init__(autocast=False, **kwargs)
        dual_attention_layers = tuple(int(i) for i in dual_attention_layers or ())
        bad = [i for i in dual_attention_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"dual_attention_layers {bad} are out of range for "
                f"num_layers={num_layers}."
            )
        if hidden_dim % num_heads:
            raise ValueError(
                f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}."
            )
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.position_size = position_size
        self.patch_size = patch_size
        self.latent_channels = latent_channels
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        self.qk_norm = qk_norm
        self.dual_attention_layers = dual_attention_layers
        self.mlp_ratio = mlp_ratio

        def dense(units, name, dtype=None, activation=None):
            return keras.layers.Dense(
                units,
                activation=activation,
                name=name,
                dtype=dtype or self.dtype_policy,
            )

        self.patch_embedding = keras.layers.Conv2D(
            hidden_dim,
            patch_size,
            strides=patch_size,
            padding="valid",
            data_format="channels_last",
            name="patch_embedding",
            dtype=self.dtype_policy,
        )
        f32 = "float32"
        self.timestep_dense_1 = dense(hidden_dim, "timestep_dense_1", f32, "silu")
        self.timestep_dense_2 = dense(hidden_dim, "timestep_dense_2", f32)
        self.pooled_dense_1 = dense(hidden_dim, "pooled_dense_1", f32, "silu")
        self.pooled_dense_2 = dense(hidden_dim, "pooled_dense_2", f32)
        self.context_embedding = dense(hidden_dim, "context_embedding")
        self.blocks = [
            MMDiTBlock(
                hidden_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qk_norm=qk_norm,
                context_pre_only=i == num_layers - 1,
                dual_attention=i in dual_attention_layers,
                name=f"block_{i}",
                dtype=self.dtype_policy,
            )
            for i in range(num_layers)
        ]
        self.output_modulation = Modulation(
            hidden_dim,
            2 * hidden_dim,
            name="output_modulation",
            dtype=self.dtype_policy,
        )
        self.output_projection = dense(
            patch_size * patch_size * latent_channels, "output_projection"
        )

    def build(
        self,
        latents_shape=None,
        context_shape=None,
        pooled_shape=None,
        timestep_shape=None,
    ):
        d = self.hidden_dim
        self.patch_embedding.build((None, None, None, self.latent_channels))
        self.position_embedding = self.add_weight(
            shape=(self.position_size, self.position_size, d),
            initializer="zeros",
            trainable=False,
            autocast=False,
            name="position_embedding",
        )
        self.timestep_dense_1.build((None, TIMESTEP_CHANNELS))
        self.timestep_dense_2.build((None, d))
        self.pooled_dense_1.build((None, self.pooled_dim))
        self.pooled_dense_2.build((None, d))
        self.context_embedding.build((None, None, self.context_dim))
        for block in self.blocks:
            block.build((None, None, d), (None, None, d), (None, d))
        self.output_modulation.build((None, d))
        self.output_projection.build((None, None, d))

    def _cropped_positions(self, grid_h, grid_w):
        size = self.position_size
        if isinstance(grid_h, int) and isinstance(grid_w, int):
            if grid_h > size or grid_w > size:
                raise ValueError(
                    f"A latent of {grid_h}x{grid_w} patches does not fit the "
                    f"{size}x{size} position table."
                )
        top = (size - grid_h) // 2
        left = (size - grid_w) // 2
        table = ops.convert_to_tensor(self.position_embedding)
        table = ops.slice(table, (top, left, 0), (grid_h, grid_w, self.hidden_dim))
        return ops.reshape(ops.cast(table, "float32"), (1, -1, self.hidden_dim))

    def embed_context(self, context):
        """Text context -> the token stream's input, `(B, T, hidden)` float32.

        It does not depend on the timestep: a sampling loop computes it once
        and passes `context_embedded=True` to every step.
        """
        return ops.cast(linear(self.context_embedding, context), "float32")

    def call(
        self,
        latents,
        context,
        pooled,
        timestep,
        context_embedded=False,
        last_token_repeats=1,
    ):
        p = self.patch_size
        shape = ops.shape(latents)
        batch = shape[0]
        grid_h, grid_w = shape[1] // p, shape[2] // p

        x = self.patch_embedding(latents)
        x = ops.reshape(x, (batch, grid_h * grid_w, self.hidden_dim))
        x = ops.cast(x, "float32") + self._cropped_positions(grid_h, grid_w)

        # Conditioning, once per call: temb = MLP(sincos(t)) + MLP(pooled).
        timestep = ops.broadcast_to(ops.reshape(timestep, (-1,)), (batch,))
        t_emb = self.timestep_dense_2(
            self.timestep_dense_1(timestep_embedding(timestep))
        )
        p_emb = self.pooled_dense_2(self.pooled_dense_1(pooled))
        conditioning = silu(t_emb + p_emb)

        if not context_embedded:
            context = self.embed_context(context)
        repeats = {"last_token_repeats": int(last_token_repeats)}
        # Blocks alike share one trace.
        call_block = layer_caller(call_layer, layers=self.blocks)
        for block in self.blocks:
            if block.context_pre_only:
                x = call_block(block, x, context, conditioning, **repeats)
            else:
                x, context = call_block(block, x, context, conditioning, **repeats)

        scale, shift = chunks(call_layer(self.output_modulation, conditioning), 2)
        x = norm_modulate(x, shift, scale, self.compute_dtype)
        x = linear(self.output_projection, x)
        c = self.latent_channels
        x = ops.reshape(x, (batch, grid_h, grid_w, p, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (batch, grid_h * p, grid_w * p, c))

    def compute_output_shape(
        self,
        latents_shape,
        context_shape=None,
        pooled_shape=None,
        timestep_shape=None,
        context_embedded=False,
        last_token_repeats=1,
    ):
        return tuple(latents_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "position_size": self.position_size,
                "patch_size": self.patch_size,
                "latent_channels": self.latent_channels,
                "context_dim": self.context_dim,
                "pooled_dim": self.pooled_dim,
                "qk_norm": self.qk_norm,
                "dual_attention_layers": list(self.dual_attention_layers),
                "mlp_ratio": self.mlp_ratio,
            }
        )
        return config
