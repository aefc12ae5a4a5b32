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
  quarter of that speed, and with 10x the rounding error);
- `upsample_conv2d`: a 2x nearest upsampling and 3x3 convolution as one 2x2
  convolution of four phases, then an interleave.

The results agree with the plain Keras layers to float rounding
(tests/test_fast_conv.py).
"""

import keras
from keras import ops

from keras_diffusion.utils.backend import backend_name
from keras_diffusion.utils.cpu_kernels import emulated_bfloat16, tf_onednn_bfloat16
from keras_diffusion.utils.fast_ops import cast
from keras_diffusion.utils.shared_traces import traced_once


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
    # torch's "same" padding is symmetric: stride 1 and odd kernels only.
    odd_same = strides == (1, 1) and all(k % 2 for k in kernel_size)
    backend = backend_name()
    torch_unsafe = backend == "torch" and same and not odd_same
    if backend == "jax" or not _plain(layer) or torch_unsafe:
        return layer(inputs)
    return _convolve(inputs, layer.kernel, layer.bias, layer, strides)


def upsample_conv2d(layer, inputs):
    """`conv2d(layer, x)` of `x`, the nearest-neighbour 2x upsampling of `inputs`.

    For a 3x3 stride-1 "same" `layer`, the upsampled tensor is never made.
    Each output pixel `(2m + r, 2n + s)` sees only a 2x2 window of input
    pixels, through a kernel whose taps are sums of the layer's taps that
    land on the same input pixel. So one 2x2 "valid" convolution of the
    zero-padded input, with the four phases' kernels side by side, then
    interleaving the phases, gives the output: 4/9 of the FLOPs, and none
    of the 4x-sized upsampled tensor (the largest in a VAE decoder). Any
    other layer is called on the upsampled tensor.

    Examples:

    >>> import numpy as np
    >>> layer = keras.layers.Conv2D(4, 3, padding="same")
    >>> x = np.random.default_rng(0).standard_normal((1, 3, 5, 2), "float32")
    >>> up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    >>> out = keras.ops.convert_to_numpy(upsample_conv2d(layer, x))
    >>> bool(np.allclose(out, keras.ops.convert_to_numpy(layer(up)), atol=1e-5))
    True
    """
    if not layer.built:
        layer.build((None, None, None, inputs.shape[-1]))
    if not (
        _plain(layer)
        and tuple(layer.kernel_size) == (3, 3)
        and tuple(layer.strides) == (1, 1)
        and layer.padding == "same"
    ):
        return conv2d(layer, ops.repeat(ops.repeat(inputs, 2, axis=1), 2, axis=2))
    channels = layer.filters
    taps = ops.convert_to_tensor(PHASE_TAPS, "float32")
    kernel = ops.einsum(
        "rua,svb,abio->uvirso", taps, taps, cast(layer.kernel, "float32")
    )
    kernel = ops.reshape(kernel, (2, 2, kernel.shape[2], 4 * channels))
    bias = None if layer.bias is None else ops.tile(layer.bias, [4])
    padded = _pad_by_one(inputs)
    out = _convolve(padded, kernel, bias, layer, (1, 1), padding="valid")
    return _interleave_phases(out, channels)


def _pad_by_one(x):
    """Channels-last `x` zero-padded by one pixel around its spatial axes."""
    if backend_name() == "torch":
        import torch

        return torch.nn.functional.pad(ops.convert_to_tensor(x), (0, 0, 1, 1, 1, 1))
    return ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _interleave_phases(out, channels):
    """The `(B, 2H, 2W, C)` output from the `(B, H + 1, W + 1, 4C)` phases.

    Output pixel `(2m + r, 2n + s)` is phase `(r, s)` of window
    `(m + r, n + s)`. On torch the phases are copied into one buffer, in
    torch calls: stacking made two more tensors of the output's size, and
    Keras' torch tree utilities, which every `keras.ops` call runs its
    arguments through, leave them in reference cycles, so the slices (views
    of the whole convolution output) outlived the call until Python's cycle
    collector ran (~0.15 GB still resident after a `bench` decode).
    """
    batch, rows, cols = ops.shape(out)[:3]
    height, width = rows - 1, cols - 1
    windows = [(r, s) for r in (0, 1) for s in (0, 1)]
    if backend_name() == "torch":
        import torch

        phases = out.reshape(batch, rows, cols, 2, 2, channels)
        result = torch.empty(
            (batch, height, 2, width, 2, channels), dtype=out.dtype, device=out.device
        )
        for r, s in windows:
            result[:, :, r, :, s] = phases[:, r : r + height, s : s + width, r, s]
        return result.reshape(batch, 2 * height, 2 * width, channels)
    phases = ops.reshape(out, (batch, rows, cols, 2, 2, channels))
    picked = [phases[:, r : r + height, s : s + width, r, s] for r, s in windows]
    by_row = [ops.stack(picked[2 * r : 2 * r + 2], axis=3) for r in (0, 1)]
    result = ops.stack(by_row, axis=2)  # (B, H, 2, W, 2, C)
    return ops.reshape(result, (batch, 2 * height, 2 * width, channels))


# `upsample_conv2d`'s tap sums: PHASE_TAPS[r][u][a] is 1 where tap `a` of
# the 3x3 kernel (upsampled rows -1, 0, +1 around output row 2m + r) falls
# on padded input row m + r + u, i.e. input row m + r + u - 1 (likewise for
# columns).
PHASE_TAPS = [
    [[1, 0, 0], [0, 1, 1]],
    [[1, 1, 0], [0, 0, 1]],
]


def _plain(layer):
    """Whether `layer` is a Conv2D that `_convolve` can run by its weights."""
    return not (
        layer.data_format != "channels_last"
        or layer.groups != 1
        or tuple(layer.dilation_rate) != (1, 1)
        or layer.activation is not keras.activations.linear
        or getattr(layer, "lora_enabled", False)
        or layer.quantization_mode is not None
        or layer.padding not in ("same", "valid")
    )


def _convolve(inputs, kernel, bias, layer, strides, padding=None):
    """`inputs` convolved as `layer` would, with `kernel` and `bias` instead.

    `padding` ("same" or "valid") overrides the layer's.
    """
    padding = padding or layer.padding
    dtype = layer.compute_dtype
    kernel = cast(kernel, dtype)
    bias = None if bias is None else cast(bias, dtype)
    backend = backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        out = tf.nn.conv2d(cast(inputs, dtype), kernel, strides, padding.upper())
        return out if bias is None else tf.nn.bias_add(out, bias)
    if backend != "torch":
        out = ops.conv(cast(inputs, dtype), kernel, strides, padding)
        return out if bias is None else out + bias
    import torch

    x = cast(inputs, dtype)
    # Without bfloat16 kernels on this CPU, compute in float32 (`cpu_kernels`).
    work = "float32" if emulated_bfloat16(x) else dtype
    # NHWC memory seen as NCHW: torch picks its channels-last kernel.
    x = cast(x, work).permute(0, 3, 1, 2)
    kernel = cast(kernel, work).permute(3, 2, 0, 1)
    bias = None if bias is None else cast(bias, work)
    # torch's "same" padding is symmetric: `conv2d` passes only odd kernels.
    pads = tuple(k // 2 for k in kernel.shape[2:]) if padding == "same" else 0
    out = torch.nn.functional.conv2d(x, kernel, bias, strides, pads)
    return cast(out.permute(0, 2, 3, 1), dtype)


def group_norm(x, groups, gamma, beta, epsilon):
    """Group norm of channels-last `x` over its last axis, in float32.

    The statistics take two passes (mean, then the mean squared deviation),
    accurate for the large activations of VAE decoders; on torch the second
    pass and the affine map are its native kernel, run on the centred input.
    On torch, and on tensorflow with oneDNN (`cpu_kernels.tf_onednn_bfloat16`)
    for bfloat16, a half-precision `x` keeps its dtype: the statistics are
    still accumulated in float32, but no float32 copy of a VAE's largest
    tensors is made (three of them were alive at once), and the output
    comes back in `x`'s dtype, which the next convolution reads.

    Examples:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 4, 4, 8), "float32")
    >>> out = group_norm(x, 2, np.ones(8, "float32"), np.zeros(8, "float32"), 1e-6)
    >>> bool(abs(float(keras.ops.mean(out))) < 1e-5)
    True
    """
    if backend_name() == "tensorflow":
        gamma, beta = cast(gamma, "float32"), cast(beta, "float32")
        x = ops.convert_to_tensor(x)
        if not (x.dtype == "bfloat16" and tf_onednn_bfloat16()):
            x = cast(x, "float32")
        # One nested trace per shape: a group norm traces as ~40 graph ops,
        # and a VAE has dozens of them, most alike (`shared_traces`).
        return traced_once(_tf_group_norm, (x, gamma, beta), (groups, epsilon))
    shape = ops.shape(x)
    channels = x.shape[-1]
    if backend_name() == "torch" and len(shape) == 4:
        import torch

        # Group means from per-channel means (a contiguous reduction, summed
        # in float32). torch's channels-last kernel takes one-pass moments,
        # which lose the variance of far-from-zero groups; on the centred
        # input they do not (a half-precision mean leaves at most 2**-8 of
        # it). The kernel accumulates in float32 for half-precision inputs.
        x = ops.convert_to_tensor(x)
        if x.dtype not in (torch.bfloat16, torch.float16):
            x = x.float()
        pixels = x.reshape(shape[0], -1, channels)
        if x.dtype == torch.bfloat16:
            # A bfloat16 sum accumulates in float32 and rounds once; a mean,
            # or a sum to float32, of (512 * 512, 32) took ~20x as long
            # (14 against 0.7 ms, ad hoc), ~0.1 s of a `bench` img2img call.
            channel_mean = pixels.sum(1).float() / pixels.shape[1]
        else:  # float16 sums could overflow
            channel_mean = torch.mean(pixels, dim=1, dtype=torch.float32)
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
    grouped = ops.reshape(x, (shape[0], -1, groups, channels // groups))
    mean = ops.mean(grouped, axis=(1, 3), keepdims=True)
    centred = grouped - mean
    variance = ops.mean(ops.square(centred), axis=(1, 3), keepdims=True)
    normed = ops.reshape(centred * ops.rsqrt(variance + epsilon), shape)
    return normed * ops.cast(gamma, "float32") + ops.cast(beta, "float32")


def _tf_group_norm(x, gamma, beta, groups, epsilon):
    """`group_norm` on tensorflow.

    Per-channel means are one batched matmul of a `1/n` row with the
    `(B, n, C)` pixels (oneDNN; an Eigen reduction over axes 1 and 3 of
    `(B, n, G, C/G)` is ~4x slower on a 256x256x64 decoder activation), then
    averaged within each group. The squared deviations take one pass, and
    the normalization and affine map fold into one `x * scale + shift`.
    A bfloat16 `x` stays bfloat16 (oneDNN's matmuls accumulate in float32):
    it is centred on the rounded group mean, and the rest of the mean and
    the variance come from the centred values, which keeps the variance of
    far-from-zero groups; after a `bench` decode tensorflow's resident set
    was 0.13 GB smaller.
    """
    import tensorflow as tf

    dtype = x.dtype
    shape = x.shape if x.shape.is_fully_defined() else tf.shape(x)
    channels = x.shape[-1]
    pixels = tf.reshape(x, (shape[0], -1, channels))
    count = pixels.shape[1]
    if count is None:
        count = tf.shape(pixels)[1]
        row = tf.fill(tf.stack([1, 1, count]), 1.0 / tf.cast(count, "float32"))
    else:
        row = tf.fill((1, 1, count), 1.0 / count)
    row = tf.cast(row, dtype)
    per_group = (shape[0], -1, groups, channels // groups)

    def group_means(values):  # (B, n, C) -> float32 (B, 1, G, 1)
        channel_means = tf.reshape(tf.matmul(row, values), per_group)
        return tf.reduce_mean(tf.cast(channel_means, "float32"), -1, keepdims=True)

    grouped = tf.reshape(pixels, per_group)
    mean = group_means(pixels)
    gamma = tf.reshape(gamma, (groups, -1))
    beta = tf.reshape(beta, (groups, -1))
    if dtype != tf.float32:
        # Centred on the mean rounded to `dtype` (the matmul's output is
        # rounded too); what is left of the mean is then small, and a second
        # pass finds it to a small rounding error.
        centred = grouped - tf.cast(mean, dtype)
        flat = (shape[0], -1, channels)
        rest = group_means(tf.reshape(centred, flat))
        squares = group_means(tf.reshape(tf.square(centred), flat))
        variance = tf.maximum(squares - tf.square(rest), 0.0)
        scale = tf.math.rsqrt(variance + epsilon) * gamma
        shift = beta - rest * scale
        out = centred * tf.cast(scale, dtype) + tf.cast(shift, dtype)
        return tf.reshape(out, shape)
    deviations = tf.math.squared_difference(grouped, mean)
    variance = group_means(tf.reshape(deviations, (shape[0], -1, channels)))
    scale = tf.math.rsqrt(variance + epsilon) * gamma
    shift = beta - mean * scale
    return tf.reshape(grouped * scale + shift, shape)
