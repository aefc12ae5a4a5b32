"""Building blocks of the SD3 VAE: group norm, residual, attention, resampling.

All layers are channels last, `(B, H, W, C)`. Group norms and the attention
softmax run in float32 whatever the dtype policy.
"""

import keras
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.utils.fast_attention import attention
from keras_diffusion.utils.fast_conv import conv2d, group_norm, upsample_conv2d
from keras_diffusion.utils.fast_elementwise import residual_add, silu


def _conv(filters, kernel_size, name, dtype, strides=1, padding="same"):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        name=name,
        dtype=dtype,
    )


@register
class GroupNorm(keras.layers.Layer):
    """Group normalization over the last axis, in float32 arithmetic.

    Statistics are computed in two passes (mean, then the mean squared
    deviation), which stays accurate for the large activations of VAE
    decoders. Weights: `gamma` and `beta`, shape `(channels,)`, float32.
    The output is float32, except on torch for a half-precision input,
    which it keeps (`fast_conv.group_norm`).

    Args:
        groups: int, the number of channel groups; must divide the channels.
        epsilon: float, added to the variance.

    Examples:

    >>> import numpy as np
    >>> norm = GroupNorm(groups=4)
    >>> tuple(norm(np.random.rand(1, 4, 4, 8).astype("float32")).shape)
    (1, 4, 4, 8)
    """

    def __init__(self, groups=32, epsilon=1e-6, **kwargs):
        kwargs["dtype"] = "float32"
        # Inputs are not autocast: `group_norm` casts them itself, and on
        # torch reads a half-precision input without a float32 copy.
        super().__init__(autocast=False, **kwargs)
        self.groups = groups
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"{self.name}: {channels} channels do not divide into "
                f"{self.groups} groups."
            )
        self.gamma = self.add_weight(
            shape=(channels,), initializer="ones", name="gamma"
        )
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x):
        return group_norm(x, self.groups, self.gamma, self.beta, self.epsilon)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update({"groups": self.groups, "epsilon": self.epsilon})
        return config


@register
class ResnetBlock(keras.layers.Layer):
    """Pre-norm residual block: (norm, SiLU, 3x3 conv) twice, plus skip.

    The skip is a 1x1 conv when the channel count changes.

    Args:
        input_channels: int, channels of the input.
        output_channels: int, channels of the output.
        norm_groups: int, groups of both group norms.
        norm_epsilon: float, epsilon of both group norms.

    Examples:

    >>> import numpy as np
    >>> block = ResnetBlock(8, 16, norm_groups=4)
    >>> tuple(block(np.zeros((1, 4, 4, 8), "float32")).shape)
    (1, 4, 4, 16)
    """

    def __init__(
        self,
        input_channels,
        output_channels,
        norm_groups=32,
        norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_channels = input_channels
        self.output_channels = output_channels
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        self.norm1 = GroupNorm(norm_groups, norm_epsilon, name="norm1")
        self.conv1 = _conv(output_channels, 3, "conv1", self.dtype_policy)
        self.norm2 = GroupNorm(norm_groups, norm_epsilon, name="norm2")
        self.conv2 = _conv(output_channels, 3, "conv2", self.dtype_policy)
        self.conv_shortcut = None
        if input_channels != output_channels:
            self.conv_shortcut = _conv(
                output_channels, 1, "conv_shortcut", self.dtype_policy
            )

    def build(self, input_shape=None):
        in_shape = (None, None, None, self.input_channels)
        out_shape = (None, None, None, self.output_channels)
        self.norm1.build(in_shape)
        self.conv1.build(in_shape)
        self.norm2.build(out_shape)
        self.conv2.build(out_shape)
        if self.conv_shortcut is not None:
            self.conv_shortcut.build(in_shape)

    def call(self, x):
        # The norms' outputs and the residual branch are temporaries.
        h = conv2d(self.conv1, silu(self.norm1(x), overwrite=True))
        h = conv2d(self.conv2, silu(self.norm2(h), overwrite=True))
        if self.conv_shortcut is not None:
            x = conv2d(self.conv_shortcut, x)
        return residual_add(x, h)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "input_channels": self.input_channels,
                "output_channels": self.output_channels,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
            }
        )
        return config


@register
class AttentionBlock(keras.layers.Layer):
    """Single-head spatial self-attention with group norm and a residual.

    Every pixel attends to every pixel; scores are scaled by
    `channels ** -0.5` and softmaxed in float32.

    Args:
        channels: int, channels of the input and output.
        norm_groups: int, groups of the group norm.
        norm_epsilon: float, epsilon of the group norm.

    Examples:

    >>> import numpy as np
    >>> attention = AttentionBlock(16, norm_groups=4)
    >>> tuple(attention(np.zeros((1, 3, 5, 16), "float32")).shape)
    (1, 3, 5, 16)
    """

    def __init__(self, channels, norm_groups=32, norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        self.group_norm = GroupNorm(norm_groups, norm_epsilon, name="group_norm")

        def dense(name):
            return keras.layers.Dense(channels, name=name, dtype=self.dtype_policy)

        self.to_q = dense("to_q")
        self.to_k = dense("to_k")
        self.to_v = dense("to_v")
        self.to_out = dense("to_out")

    def build(self, input_shape=None):
        self.group_norm.build((None, None, None, self.channels))
        for layer in (self.to_q, self.to_k, self.to_v, self.to_out):
            layer.build((None, None, self.channels))

    def call(self, x):
        shape = ops.shape(x)
        tokens = ops.reshape(self.group_norm(x), (shape[0], -1, self.channels))

        def heads(layer):
            # (B, T, C) -> (B, T, 1 head, C), in float32 for the softmax.
            return ops.expand_dims(ops.cast(layer(tokens), "float32"), 2)

        attended = attention(
            heads(self.to_q),
            heads(self.to_k),
            heads(self.to_v),
            scale=float(self.channels) ** -0.5,
        )
        attended = ops.cast(ops.squeeze(attended, 2), self.compute_dtype)
        out = ops.reshape(self.to_out(attended), shape)
        return x + ops.cast(out, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
            }
        )
        return config


@register
class Downsample(keras.layers.Layer):
    """Halve height and width: zero-pad bottom and right by 1, 3x3 conv, stride 2.

    Args:
        channels: int, channels of the input and output.

    Examples:

    >>> import numpy as np
    >>> tuple(Downsample(8)(np.zeros((1, 32, 48, 8), "float32")).shape)
    (1, 16, 24, 8)
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = _conv(
            channels, 3, "conv", self.dtype_policy, strides=2, padding="valid"
        )

    def build(self, input_shape=None):
        self.conv.build((None, None, None, self.channels))

    def call(self, x):
        return conv2d(self.conv, ops.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels})
        return config


@register
class Upsample(keras.layers.Layer):
    """Double height and width: nearest-neighbour 2x, then a 3x3 conv.

    Args:
        channels: int, channels of the input and output.

    Examples:

    >>> import numpy as np
    >>> tuple(Upsample(8)(np.zeros((1, 4, 6, 8), "float32")).shape)
    (1, 8, 12, 8)
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = _conv(channels, 3, "conv", self.dtype_policy)

    def build(self, input_shape=None):
        self.conv.build((None, None, None, self.channels))

    def call(self, x):
        return upsample_conv2d(self.conv, x)

    def get_config(self):
        config = super().get_config()
        config.update({"channels": self.channels})
        return config


@register
class MidBlock(keras.layers.Layer):
    """Residual block, attention, residual block, at constant width.

    Args:
        channels: int, channels of the input and output.
        norm_groups: int, groups of every group norm.
        norm_epsilon: float, epsilon of every group norm.

    Examples:

    >>> import numpy as np
    >>> tuple(MidBlock(16, norm_groups=4)(np.zeros((1, 4, 6, 16), "float32")).shape)
    (1, 4, 6, 16)
    """

    def __init__(self, channels, norm_groups=32, norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        args = dict(
            norm_groups=norm_groups, norm_epsilon=norm_epsilon, dtype=self.dtype_policy
        )
        self.resnet_0 = ResnetBlock(channels, channels, name="resnet_0", **args)
        self.attention = AttentionBlock(channels, name="attention", **args)
        self.resnet_1 = ResnetBlock(channels, channels, name="resnet_1", **args)

    def build(self, input_shape=None):
        for layer in (self.resnet_0, self.attention, self.resnet_1):
            layer.build((None, None, None, self.channels))

    def call(self, x):
        return self.resnet_1(self.attention(self.resnet_0(x)))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "norm_groups": self.norm_groups,
                "norm_epsilon": self.norm_epsilon,
            }
        )
        return config
