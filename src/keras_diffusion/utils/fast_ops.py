"""The fastest CPU path of each hot operation, per backend.

Model code calls these instead of the plain layer or op where a backend has
a faster kernel; the results agree with the plain Keras computation to float
rounding (tests/test_fast_ops.py):

- `attention`: torch's fused `scaled_dot_product_attention`; query-blocked
  einsums on jax and tensorflow;
- `linear`: a Dense layer with its bias folded into the matmul on torch;
- `conv2d`, `group_norm`: on torch, one oneDNN convolution or one native
  group norm on a channels-last *view* of the NHWC tensor. Keras' own torch
  convolution copies the input to NCHW, back to channels-last memory and
  pads it explicitly: three copies of every VAE activation per convolution.
"""

import keras
from keras import ops

from keras_diffusion.utils.backend import backend_name

# Queries per block of `attention` on jax / tensorflow (see there).
ATTENTION_QUERY_BLOCK = 512


def attention(query, key, value, scale=None):
    """Softmax attention, `(B, T, heads, head_dim)` in and out.

    Scores and softmax are float32; the result has the query's dtype.
    torch runs its fused kernel (`scaled_dot_product_attention` through
    `ops.dot_product_attention`). On jax and tensorflow, that op is 1.6-3x
    slower on CPU than plain einsums over blocks of `ATTENTION_QUERY_BLOCK`
    queries (measured with 1,178 tokens, 6 heads of 64; blocks keep the
    score matrix in cache), which is what runs there.

    Examples:

    >>> import numpy as np
    >>> q = np.random.default_rng(0).standard_normal((1, 5, 2, 4), "float32")
    >>> out = attention(q, q, q)
    >>> ref = keras.ops.dot_product_attention(q, q, q)
    >>> bool(np.allclose(out, ref, atol=1e-6))
    True
    """
    dtype = query.dtype
    head_dim = query.shape[-1]
    scale = float(head_dim) ** -0.5 if scale is None else float(scale)
    if backend_name() == "torch":
        return ops.dot_product_attention(query, key, value, scale=scale)
    query = ops.multiply(query, ops.cast(scale, query.dtype))
    tokens = query.shape[1]
    block = ATTENTION_QUERY_BLOCK
    if not isinstance(tokens, int) or tokens <= block:
        return _attend_block(query, key, value, dtype)
    blocks = [
        _attend_block(query[:, start : start + block], key, value, dtype)
        for start in range(0, tokens, block)
    ]
    return ops.concatenate(blocks, axis=1)


def _attend_block(query, key, value, dtype):
    scores = ops.cast(ops.einsum("bqhd,bkhd->bhqk", query, key), "float32")
    weights = ops.cast(ops.softmax(scores, axis=-1), value.dtype)
    return ops.cast(ops.einsum("bhqk,bkhd->bqhd", weights, value), dtype)


def linear(layer, inputs):
    """`layer(inputs)` for a `keras.layers.Dense`, bias add fused on torch.

    Keras' Dense issues a matmul and then a separate bias add, which is ~10%
    of a CPU denoising step under torch; `torch.nn.functional.linear` folds
    the bias into the matmul (one `addmm`, as torch modules do). Other
    backends fuse it in their compilers. Layers with LoRA, quantization, an
    activation or no bias are simply called.
    """
    if (
        backend_name() != "torch"
        or layer.lora_enabled
        or layer.quantization_mode is not None
        or layer.activation is not keras.activations.linear
        or layer.bias is None
    ):
        return layer(inputs)
    import torch

    dtype = layer.compute_dtype
    kernel = ops.cast(layer.kernel, dtype)
    bias = ops.cast(layer.bias, dtype)
    return torch.nn.functional.linear(ops.cast(inputs, dtype), kernel.T, bias)


def conv2d(layer, inputs):
    """`layer(inputs)` for a channels-last `keras.layers.Conv2D`.

    On torch, a 2D convolution without groups or dilation, with "valid" or
    stride-1 "same" padding of an odd kernel, runs as one `conv2d` on
    channels-last memory; anything else is simply called.

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
    if (
        backend_name() != "torch"
        or layer.data_format != "channels_last"
        or layer.groups != 1
        or tuple(layer.dilation_rate) != (1, 1)
        or layer.activation is not keras.activations.linear
        or getattr(layer, "lora_enabled", False)
        or layer.quantization_mode is not None
        or layer.padding not in ("same", "valid")
        or (same and (strides != (1, 1) or not all(k % 2 for k in kernel_size)))
    ):
        return layer(inputs)
    import torch

    dtype = layer.compute_dtype
    # NHWC memory seen as NCHW: torch picks its channels-last kernel.
    x = ops.cast(inputs, dtype).permute(0, 3, 1, 2)
    kernel = ops.cast(layer.kernel, dtype).permute(3, 2, 0, 1)
    bias = None if layer.bias is None else ops.cast(layer.bias, dtype)
    padding = tuple(k // 2 for k in kernel_size) if same else 0
    out = torch.nn.functional.conv2d(x, kernel, bias, strides, padding)
    return out.permute(0, 2, 3, 1)


def group_norm(x, groups, gamma, beta, epsilon):
    """Group norm of channels-last `x` over its last axis, in float32.

    The statistics take two passes (mean, then the mean squared deviation),
    accurate for the large activations of VAE decoders; on torch the second
    pass and the affine map are its native kernel, run on the centred input.

    Examples:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1, 4, 4, 8), "float32")
    >>> out = group_norm(x, 2, np.ones(8, "float32"), np.zeros(8, "float32"), 1e-6)
    >>> bool(abs(float(keras.ops.mean(out))) < 1e-5)
    True
    """
    x = ops.cast(x, "float32")
    shape = ops.shape(x)
    channels = x.shape[-1]
    if backend_name() == "torch" and len(shape) == 4:
        import torch

        # Group means from per-channel means (a contiguous reduction). torch's
        # channels-last kernel takes one-pass moments, which lose the variance
        # of far-from-zero groups; on the centred input they do not.
        channel_mean = torch.mean(x, dim=(1, 2))
        group_mean = channel_mean.reshape(shape[0], groups, -1).mean(-1, keepdim=True)
        group_mean = group_mean.expand(-1, -1, channels // groups)
        centred = x - group_mean.reshape(shape[0], 1, 1, channels)
        out = torch.nn.functional.group_norm(
            centred.permute(0, 3, 1, 2),
            groups,
            ops.cast(gamma, "float32"),
            ops.cast(beta, "float32"),
            epsilon,
        )
        return out.permute(0, 2, 3, 1)
    grouped = ops.reshape(x, (shape[0], -1, groups, channels // groups))
    mean = ops.mean(grouped, axis=(1, 3), keepdims=True)
    centred = grouped - mean
    variance = ops.mean(ops.square(centred), axis=(1, 3), keepdims=True)
    normed = ops.reshape(centred * ops.rsqrt(variance + epsilon), shape)
    return normed * ops.cast(gamma, "float32") + ops.cast(beta, "float32")
