"""Element-wise hot paths, per backend: AdaLN, residuals, norms, SiLU.

As `utils.fast_ops` (dense layers, casts), model code calls these instead of
the plain ops where a backend has a faster path; the results agree with the
plain Keras computation to float rounding (tests/test_fast_elementwise.py).

- `modulate`, `gated_residual`, `norm_modulate`: AdaLN's element-wise maths
  as one fused pass each on torch (`norm_modulate` folds the layer norm in);
- `silu`, `residual_add`: on torch, in place where the caller hands over a
  temporary that no gradient flows through;
- `layer_norm`, `layer_normalization`, `silu`: on tensorflow written out in
  fewer graph ops than Keras traces (a first call's tracing costs about a
  millisecond per op on this CPU).
"""

import keras
from keras import ops

from keras_diffusion.utils.backend import backend_name
from keras_diffusion.utils.fast_ops import cast, torch_dtype


def modulate(x, shift, scale):
    """AdaLN: `x * (1 + scale) + shift`, per batch item, in float32.

    `x` is `(B, T, D)`, `shift` and `scale` `(B, D)`. On torch one fused
    `addcmul` pass instead of a multiply and an add.

    Examples:

    >>> import numpy as np
    >>> x = np.ones((1, 2, 3), "float32")
    >>> shift, scale = np.full((1, 3), 0.5, "float32"), np.ones((1, 3), "float32")
    >>> keras.ops.convert_to_numpy(modulate(x, shift, scale))[0, 0].tolist()
    [2.5, 2.5, 2.5]
    """
    x, shift, scale = (cast(v, "float32") for v in (x, shift, scale))
    if backend_name() == "torch":
        import torch

        return torch.addcmul(shift[:, None, :], x, 1.0 + scale[:, None, :])
    return x * (1.0 + _tokens_axis(scale)) + _tokens_axis(shift)


def norm_modulate(x, shift, scale, epsilon, dtype="float32"):
    """`modulate(layer_norm(x, epsilon), shift, scale)`, returned in `dtype`.

    The arithmetic is float32. On torch at inference, one layer norm per
    batch item with `1 + scale` and `shift` as its affine weights, written
    straight into the `dtype` result: one pass over `x` instead of three
    (norm, `addcmul`, cast), and one allocation instead of three (measured
    ad hoc on a (2, 1024, 384) float32 input: 0.5 ms against 1.6-3.6 ms).

    Examples:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 8), "float32")
    >>> shift, scale = np.ones((2, 8), "float32"), np.full((2, 8), 0.5, "float32")
    >>> fused = norm_modulate(x, shift, scale, 1e-6)
    >>> plain = modulate(layer_norm(x, 1e-6), shift, scale)
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> bool(np.allclose(to_numpy(fused), to_numpy(plain), atol=1e-5))
    True
    """
    if backend_name() == "torch":
        import torch

        target = torch_dtype(dtype)
        if not torch.is_grad_enabled() and target is not None:
            x, shift, scale = (cast(v, "float32") for v in (x, shift, scale))
            weight = 1.0 + scale
            out = torch.empty(x.shape, dtype=target, device=x.device)
            width = x.shape[-1:]
            for item in range(x.shape[0]):
                out[item] = torch.nn.functional.layer_norm(
                    x[item], width, weight[item], shift[item], epsilon
                )
            return out
    return cast(modulate(layer_norm(x, epsilon), shift, scale), dtype)


def gated_residual(x, gate, update):
    """`x + gate * update`, per batch item, in float32 (the residual stream).

    `x` and `update` are `(B, T, D)` (`update` in any float dtype), `gate`
    `(B, D)`. On torch one fused `addcmul` pass.

    Examples:

    >>> import numpy as np
    >>> x, y = np.ones((1, 2, 3), "float32"), np.full((1, 2, 3), 2.0, "float32")
    >>> gate = np.full((1, 3), 0.5, "float32")
    >>> keras.ops.convert_to_numpy(gated_residual(x, gate, y))[0, 0].tolist()
    [2.0, 2.0, 2.0]
    """
    x, gate, update = (cast(v, "float32") for v in (x, gate, update))
    if backend_name() == "torch":
        import torch

        return torch.addcmul(x, gate[:, None, :], update)
    return x + _tokens_axis(gate) * update


def silu(x, overwrite=False):
    """`x * sigmoid(x)`.

    On tensorflow written as those two ops, which grappler fuses into one;
    `tf.nn.silu` adds a custom gradient whose tracing costs about three
    times as much per call (measured ad hoc: 3.2 against 0.8 ms). With
    `overwrite` (the caller's promise that `x` is a temporary it no longer
    needs) torch writes the result into `x` where no gradient flows through
    it: a VAE activation is tens of megabytes, and a fresh buffer of that
    size costs more in page faults than the SiLU itself.

    Examples:

    >>> float(silu(keras.ops.zeros((1,)))[0])
    0.0
    """
    if backend_name() == "torch" and overwrite and _is_inference_temporary(x):
        import torch

        return torch.nn.functional.silu(x, inplace=True)
    if backend_name() != "tensorflow":
        return ops.silu(x)
    import tensorflow as tf

    return x * tf.sigmoid(x)


def residual_add(x, update):
    """`x + update` in `x`'s dtype, `update` being a temporary.

    As `silu`'s `overwrite`: torch adds `x` into `update` where no gradient
    flows through it, instead of allocating the sum.

    Examples:

    >>> float(residual_add(keras.ops.ones((1,)), keras.ops.ones((1,)))[0])
    2.0
    """
    update = cast(update, keras.backend.standardize_dtype(x.dtype))
    if (
        backend_name() == "torch"
        and _is_inference_temporary(update)
        and tuple(update.shape) == tuple(x.shape)
    ):
        return update.add_(x)
    return x + update


def _is_inference_temporary(x):
    """Whether torch may overwrite `x`: no autograd graph runs through it."""
    import torch

    return isinstance(x, torch.Tensor) and not (
        torch.is_grad_enabled() and x.requires_grad
    )


def _tokens_axis(v):
    """`(B, D)` -> `(B, 1, D)`; one op (a `[:, None, :]` slice is several in
    a tensorflow trace, each a millisecond of a first call)."""
    return ops.expand_dims(v, 1)


def layer_norm(x, epsilon):
    """Non-affine layer norm over the last axis, in float32.

    Two passes: the mean, then the mean squared deviation from it. On
    tensorflow written out as 7 graph ops (`ops.layer_normalization` traces
    about twice as many, and tracing is a first call's largest cost).

    Examples:

    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 3.0, 6.0]], "float32")
    >>> out = keras.ops.convert_to_numpy(layer_norm(x, 1e-6))
    >>> ref = keras.ops.convert_to_numpy(
    ...     keras.ops.layer_normalization(x, axis=-1, epsilon=1e-6))
    >>> bool(np.allclose(out, ref, atol=1e-6))
    True
    """
    x = cast(x, "float32")
    if backend_name() == "torch":
        import torch

        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=epsilon)
    if backend_name() != "tensorflow":
        return ops.layer_normalization(x, axis=-1, epsilon=epsilon)
    import tensorflow as tf

    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), -1, keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon)


def layer_normalization(layer, inputs):
    """`layer(inputs)` for a `keras.layers.LayerNormalization`.

    On tensorflow, a norm over the last axis runs as `layer_norm` and the
    affine map (computed in float32, returned in the layer's compute dtype,
    as Keras does); anything else is simply called.

    Examples:

    >>> import numpy as np
    >>> layer = keras.layers.LayerNormalization(epsilon=1e-5)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 8), "float32")
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> fast, plain = to_numpy(layer_normalization(layer, x)), to_numpy(layer(x))
    >>> bool(np.allclose(fast, plain, atol=1e-5))
    True
    """
    if not layer.built:
        layer.build(tuple(inputs.shape))
    axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
    last = (-1, len(inputs.shape) - 1)
    if (
        backend_name() != "tensorflow"
        or layer.rms_scaling
        or not (axis in last or (len(axis) == 1 and axis[0] in last))
    ):
        return layer(inputs)
    out = layer_norm(inputs, layer.epsilon)
    if layer.gamma is not None:
        out = out * cast(layer.gamma, "float32")
    if layer.beta is not None:
        out = out + cast(layer.beta, "float32")
    return cast(out, layer.compute_dtype)
