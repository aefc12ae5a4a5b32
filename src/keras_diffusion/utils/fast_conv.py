"""The fastest CPU path of the VAE's convolution and group norm, per backend.

- `conv2d`: on torch, one oneDNN convolution on a channels-last *view* of
  the NHWC tensor (Keras' own torch convolution copies the input to NCHW,
  back to channels-last memory and pads it explicitly: three copies of
  every VAE activation per convolution), in float32 for bfloat16 layers on
  a CPU without bfloat16 kernels (`cpu_kernels.emulated_bfloat16`); on
  tensorflow `conv2d` and `bias_add`, which grappler fuses;
- `group_norm`: on torch the native kernel on the group-centred input; on
  tensorflow the per-channel sums as a matmul with a `1/n` row (an Eigen
  reduction over the pixel and in-group axes of `(B, HW, G, C/G)` ran at a
  quarter of that speed, and with 10x the rounding error).

The results agree with the plain Keras layers to float rounding
(tests/test_fast_conv.py).
"""

import keras
from keras import ops

from keras_diffusion.utils.backend import backend_name
from keras_diffusion.utils.cpu_kernels import emulated_bfloat16
from keras_diffusion.utils.fast_ops import cast


def conv2d(layer, inputs):
    """`layer(inputs)` for a channels-last `keras.layers.Conv2D`.

    On torch, a 2D convolution without groups or dilation, with "valid" or
    stride-1 "same" padding of an odd kernel, runs as one `conv2d` on
    channels-last memory. On tensorflow, one without groups or dilation is
    `conv2d` + `bias_add` (grappler fuses the pair; Keras' layer traces
    about twice the ops). Anything else is simply called.

    Examples:

    >>> import numpy as np
    >>> layer = keras.layers.Conv2D(4, 3, padding="same")
    >>> x = np.random.default_rng(0).standard_normal((1, 6, 6, 2), "float32")
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> fast, plain = to_numpy(conv2d(layer, x)), to_numpy(layer(x))
    >>> bool(np.allclose(fast, plain, atol=1e-5))
    True
    """
    if not layer.built:
        layer.build(tuple(inputs.shape))
    kernel_size = tuple(layer.kernel_size)
    strides = tuple(layer.strides)
    same = layer.padding == "same"
    plain = not (
        layer.data_format != "channels_last"
        or layer.groups != 1
        or tuple(layer.dilation_rate) != (1, 1)
        or layer.activation is not keras.activations.linear
        or getattr(layer, "lora_enabled", False)
        or layer.quantization_mode is not None
        or layer.padding not in ("same", "valid")
    )
    if backend_name() == "tensorflow" and plain:
        import tensorflow as tf

        dtype = layer.compute_dtype
        out = tf.nn.conv2d(
            cast(inputs, dtype),
            cast(layer.kernel, dtype),
            strides,
            layer.padding.upper(),
        )
        return (
            out if layer.bias is None else tf.nn.bias_add(out, cast(layer.bias, dtype))
        )
    # torch's "same" padding is symmetric: stride 1 and odd kernels only.
    odd_same = strides == (1, 1) and all(k % 2 for k in kernel_size)
    if backend_name() != "torch" or not plain or (same and not odd_same):
        return layer(inputs)
    import torch

    dtype = layer.compute_dtype
    x = cast(inputs, dtype)
    # Without bfloat16 kernels on this CPU, compute in float32 (`cpu_kernels`).
    work = "float32" if emulated_bfloat16(x) else dtype
    # NHWC memory seen as NCHW: torch picks its channels-last kernel.
    x = cast(x, work).permute(0, 3, 1, 2)
    kernel = cast(cast(layer.kernel, dtype), work).permute(3, 2, 0, 1)
    bias = None if layer.bias is None else cast(cast(layer.bias, dtype), work)
    padding = tuple(k // 2 for k in kernel_size) if same else 0
    out = torch.nn.functional.conv2d(x, kernel, bias, strides, padding)
    return cast(out.permute(0, 2, 3, 1), dtype)


def group_norm(x, groups, gamma, beta, epsilon):
    """Group norm of channels-last `x` over its last axis, in float32.

    The statistics take two passes (mean, then the mean squared deviation),
    accurate for the large activations of VAE decoders; on torch the second
    pass and the affine map are its native kernel, run on the centred input.
    On torch a half-precision `x` keeps its dtype: the statistics and the
    affine map are still float32 arithmetic, but no float32 copy of a VAE's
    largest tensors is made (three of them were alive at once), and the
    output comes back in `x`'s dtype, which the next convolution reads.

    Examples:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 4, 4, 8), "float32")
    >>> out = group_norm(x, 2, np.ones(8, "float32"), np.zeros(8, "float32"), 1e-6)
    >>> bool(abs(float(keras.ops.mean(out))) < 1e-5)
    True
    """
    shape = ops.shape(x)
    channels = x.shape[-1]
    if backend_name() == "torch" and len(shape) == 4:
        import torch

        # Group means from per-channel means (a contiguous reduction, summed
        # in float32). torch's channels-last kernel takes one-pass moments,
        # which lose the variance of far-from-zero groups; on the centred
        # input they do not (a half-precision mean leaves at most 2**-9 of
        # it). The kernel accumulates in float32 for half-precision inputs.
        x = ops.convert_to_tensor(x)
        if x.dtype not in (torch.bfloat16, torch.float16):
            x = x.float()
        channel_mean = torch.mean(x, dim=(1, 2), dtype=torch.float32)
        group_mean = channel_mean.reshape(shape[0], groups, -1).mean(-1, keepdim=True)
        group_mean = group_mean.expand(-1, -1, channels // groups)
        centred = x - group_mean.reshape(shape[0], 1, 1, channels).to(x.dtype)
        out = torch.nn.functional.group_norm(
            centred.permute(0, 3, 1, 2),
            groups,
            ops.cast(gamma, "float32"),
            ops.cast(beta, "float32"),
            epsilon,
        )
        return out.permute(0, 2, 3, 1)
    x = ops.cast(x, "float32")
    if backend_name() == "tensorflow":
        gamma, beta = cast(gamma, "float32"), cast(beta, "float32")
        return _tf_group_norm(x, groups, gamma, beta, epsilon)
    grouped = ops.reshape(x, (shape[0], -1, groups, channels // groups))
    mean = ops.mean(grouped, axis=(1, 3), keepdims=True)
    centred = grouped - mean
    variance = ops.mean(ops.square(centred), axis=(1, 3), keepdims=True)
    normed = ops.reshape(centred * ops.rsqrt(variance + epsilon), shape)
    return normed * ops.cast(gamma, "float32") + ops.cast(beta, "float32")


def _tf_group_norm(x, groups, gamma, beta, epsilon):
    """`group_norm` on tensorflow.

    Per-channel means are one batched matmul of a `1/n` row with the
    `(B, n, C)` pixels (oneDNN; an Eigen reduction over axes 1 and 3 of
    `(B, n, G, C/G)` is ~4x slower on a 256x256x64 decoder activation), then
    averaged within each group. The squared deviations take one pass, and
    the normalization and affine map fold into one `x * scale + shift`.
    """
    import tensorflow as tf

    shape = x.shape if x.shape.is_fully_defined() else tf.shape(x)
    channels = x.shape[-1]
    pixels = tf.reshape(x, (shape[0], -1, channels))
    count = pixels.shape[1]
    if count is None:
        count = tf.shape(pixels)[1]
        row = tf.fill(tf.stack([1, 1, count]), 1.0 / tf.cast(count, "float32"))
    else:
        row = tf.fill((1, 1, count), 1.0 / count)
    per_group = (shape[0], -1, groups, channels // groups)

    def group_means(values):  # (B, n, C) -> (B, 1, G, 1)
        channel_means = tf.reshape(tf.matmul(row, values), per_group)
        return tf.reduce_mean(channel_means, axis=-1, keepdims=True)

    grouped = tf.reshape(pixels, per_group)
    mean = group_means(pixels)
    deviations = tf.math.squared_difference(grouped, mean)
    variance = group_means(tf.reshape(deviations, (shape[0], -1, channels)))
    scale = tf.math.rsqrt(variance + epsilon) * tf.reshape(gamma, (groups, -1))
    shift = tf.reshape(beta, (groups, -1)) - mean * scale
    return tf.reshape(grouped * scale + shift, shape)
