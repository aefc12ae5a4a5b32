"""The fastest CPU path of each hot operation, per backend.

Model code calls these instead of the plain layer or op where a backend has
a faster kernel; the results agree with the plain Keras computation to float
rounding (tests/test_fast_ops.py). Attention has its own module,
`utils.fast_attention`.

- `linear`: a Dense layer (and GELU) on torch as oneDNN's matmul with the
  bias and GELU as post-ops at inference where the CPU favours it, else
  with its bias folded into `addmm`; on tensorflow, the 2D matmul, bias
  add and GELU that grappler fuses into one oneDNN op;
- `matmul_in_float32`: on jax, half-precision dots that ask XLA for float32
  results (its fast bfloat16 kernel);
- `cast`, which skips no-op casts;
- `call_layer`, `chunks`, `affine`: on torch, a built layer's `call` without
  Keras' `__call__`, `torch.chunk` and one `addmm` (Keras' dispatch costs
  tens of microseconds per op on torch, ~100 per layer call).

AdaLN's element-wise maths, residuals, layer norms and SiLU are in
`utils.fast_elementwise`; the VAE's convolution and group norm in
`utils.fast_conv`.
"""

import functools

import keras
from keras import ops

from keras_diffusion.utils.backend import backend_name
from keras_diffusion.utils.cpu_kernels import emulated_bfloat16, onednn_matmul_usable


def cast(x, dtype):
    """`ops.cast(x, dtype)`, free when `x` already has `dtype`.

    A denoising step casts ~300 times, mostly to the dtype a tensor already
    has; on torch, Keras' dispatch of each (~40 us) adds up to ~10 ms a step,
    and on tensorflow to a share of every trace. Keras variables are read as
    their tensors.

    Examples:

    >>> import numpy as np
    >>> x = keras.ops.ones((2,), "float32")
    >>> cast(x, "float32") is x
    True
    >>> keras.backend.standardize_dtype(cast(x, "bfloat16").dtype)
    'bfloat16'
    """
    if backend_name() == "torch":
        import torch

        if isinstance(x, keras.Variable):
            x = x.value
        target = torch_dtype(dtype)
        if isinstance(x, torch.Tensor) and target is not None:
            return x if x.dtype is target else x.to(target)
    elif backend_name() == "tensorflow":
        import tensorflow as tf

        if isinstance(x, keras.Variable):
            x = x.value
        if tf.is_tensor(x) and x.dtype == dtype:
            return x
    return ops.cast(x, dtype)


def call_layer(layer, *args, **options):
    """`layer(*args, **options)`; on torch its `call` directly, for a built
    layer and tensor `args` (`options` are Python values, passed through).

    Keras' `Layer.__call__` costs ~100 us on torch (argument binding, scopes,
    masks, torch's module hooks), against ~30 for a small layer's `call`
    (timed ad hoc); a denoising step makes ~40 such calls. The layers this
    is used for need nothing from `__call__` once built: they cast their own
    inputs and take no `training` or mask. Symbolic inputs and unbuilt
    layers take the full path.

    Examples:

    >>> import numpy as np
    >>> layer = keras.layers.Dense(3)
    >>> x = keras.ops.ones((2, 4))
    >>> to_numpy = keras.ops.convert_to_numpy
    >>> bool(np.allclose(to_numpy(call_layer(layer, x)), to_numpy(layer(x))))
    True
    """
    if backend_name() == "torch" and layer.built:
        import torch

        if all(isinstance(a, torch.Tensor) for a in args):
            return layer.call(*args, **options)
    return layer(*args, **options)


def chunks(x, count):
    """`ops.split(x, count, axis=-1)`; on torch `torch.chunk` (a third of
    the dispatch cost).

    Examples:

    >>> a, b = chunks(keras.ops.arange(4.0), 2)
    >>> keras.ops.convert_to_numpy(b).tolist()
    [2.0, 3.0]
    """
    if backend_name() == "torch":
        import torch

        return torch.chunk(_torch_tensor(x), count, dim=-1)
    return ops.split(x, count, axis=-1)


@functools.cache
def torch_dtype(dtype):
    """The torch dtype named `dtype` (a float dtype string), else None."""
    import torch

    return {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(dtype)


def linear(layer, inputs, activation=None):
    """`layer(inputs)` for a `keras.layers.Dense`, then `activation`.

    `activation` is None or "gelu_tanh" (tanh-approximated GELU). On torch:

    - at inference (no gradient being recorded) the layer is oneDNN's
      matmul, with the bias and any "gelu_tanh" as post-ops, where that
      pays on this CPU (`cpu_kernels.onednn_matmul_pays`): in bfloat16
      wherever oneDNN has bfloat16 kernels, in float32 only on AVX-512 CPUs
      and for a kernel of at most `cpu_kernels.ONEDNN_FLOAT32_MAX_KERNEL`
      entries (of any size where torch's MKL runs on a non-Intel CPU,
      `cpu_kernels.mkl_on_non_intel_cpu`). The GELU post-op saves a pass
      over the 4x-wide MLP activation; without one, oneDNN's matmul still
      beat torch's `addmm` on an AVX-512 EPYC (Zen 5) at the `bench`
      config's kernels (2,048 rows: q/k/v 4.7 against 5.2 ms in bfloat16,
      9.6 against 13.6 in float32; `benchmarks/linear_speed.py`). In
      float32 oneDNN re-lays out the transposed kernel on every call, a
      cost that grows with the weight: on an AVX-512 Xeon at SD3-medium's
      width (1536 -> 6144) the fused op took 2.3x as long as `addmm`, then
      GELU in place, while the `bench` config's step (384 -> 1536) was ~5%
      faster fused; on the EPYC oneDNN won at that width too; on an AVX2
      EPYC the fused op lost at 384 (`benchmarks/linear_speed.py --hidden
      384 --hidden 1536`, `benchmarks/step_ab.py`);
    - otherwise, and in training (oneDNN's op has no backward), the bias
      add is folded into the matmul: `addmm(bias, x, kernel)` on the kernel
      as stored, `(in, out)`, then GELU (in place at inference). Keras'
      Dense adds the bias in a separate pass; `F.linear(x, kernel.T)` ties
      with `addmm` in float32 and is slower in bfloat16.

    On tensorflow the 3D input is flattened to a 2D `matmul`, `bias_add`
    and `tf.nn.gelu`, the pattern grappler's remapper fuses into one oneDNN
    matmul (Keras' Dense reshapes between its matmul and a plain bias add,
    which stay three ops). On jax a half-precision layer's matmul asks XLA
    for float32 results (`matmul_in_float32`), and the bias and GELU are added in
    float32 before one rounding; XLA fuses the rest, and float32 layers are
    simply called. Layers with LoRA, quantization or their own activation,
    and on tensorflow layers without a bias, are simply called too. On a
    CPU without bfloat16 kernels a bfloat16 layer computes in float32 on
    torch (`cpu_kernels.emulated_bfloat16`).

    Examples:

    >>> import numpy as np
    >>> layer = keras.layers.Dense(4)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 5), "float32")
    >>> fast = keras.ops.convert_to_numpy(linear(layer, x, "gelu_tanh"))
    >>> plain = keras.ops.convert_to_numpy(keras.ops.gelu(layer(x)))
    >>> bool(np.allclose(fast, plain, atol=1e-5))
    True
    """
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh'; got {activation!r}.")
    if not layer.built:
        layer.build(tuple(inputs.shape))
    dtype = layer.compute_dtype
    backend = backend_name()
    if (
        layer.lora_enabled
        or layer.quantization_mode is not None
        or layer.activation is not keras.activations.linear
        or (backend == "jax" and dtype not in ("bfloat16", "float16"))
        or backend not in ("jax", "torch", "tensorflow")
        or (layer.bias is None and backend == "tensorflow")
    ):
        out = layer(inputs)
        return out if activation is None else ops.gelu(out, approximate=True)
    kernel = cast(layer.kernel, dtype)
    bias = None if layer.bias is None else cast(layer.bias, dtype)
    x = cast(inputs, dtype)
    if backend == "jax":
        out = matmul_in_float32(x, kernel)
        if bias is not None:
            out = out + ops.cast(bias, "float32")
        if activation is not None:
            out = ops.gelu(out, approximate=True)
        return ops.cast(out, dtype)
    if backend == "tensorflow":
        return _tf_linear(x, kernel, bias, activation)
    if emulated_bfloat16(x):
        f32 = "float32"
        bias = None if bias is None else cast(bias, f32)
        out = _torch_linear(cast(x, f32), cast(kernel, f32), bias, activation)
        return cast(out, dtype)
    return _torch_linear(x, kernel, bias, activation)


def _torch_linear(x, kernel, bias, activation):
    import torch

    if onednn_matmul_usable(x, kernel):
        # oneDNN reads the (out, in) weight as the transpose of the stored
        # contiguous (in, out) kernel without a copy.
        post_op, algorithm = ("gelu", "tanh") if activation else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(
            x, kernel.T, bias, post_op, [], algorithm
        )
    out = affine(x, kernel, bias)
    if activation is None:
        return out
    if torch.is_grad_enabled():
        return torch.nn.functional.gelu(out, approximate="tanh")
    # In place: no second 4x-wide buffer.
    return torch.ops.aten.gelu_(out, approximate="tanh")


def affine(x, kernel, bias):
    """`x @ kernel + bias` over the last axis of `x` (`bias` may be None).

    On torch one `addmm` on the flattened input (the bias add folded into
    the matmul).

    Examples:

    >>> import numpy as np
    >>> x, kernel = np.ones((2, 3, 4), "float32"), np.ones((4, 5), "float32")
    >>> out = affine(x, kernel, np.arange(5, dtype="float32"))
    >>> keras.ops.convert_to_numpy(out)[1, 2].tolist()
    [4.0, 5.0, 6.0, 7.0, 8.0]
    """
    if backend_name() == "torch":
        import torch

        x, kernel = _torch_tensor(x), _torch_tensor(kernel)
        flat = x.reshape(-1, x.shape[-1])
        if bias is None:
            out = torch.mm(flat, kernel)
        else:
            out = torch.addmm(_torch_tensor(bias), flat, kernel)
        return out.reshape(*x.shape[:-1], kernel.shape[-1])
    out = ops.matmul(x, kernel)
    return out if bias is None else out + bias


def matmul_in_float32(a, b, subscripts=None):
    """`ops.matmul(a, b)` (or `ops.einsum(subscripts, a, b)`), summed and
    returned in float32, for operands of any float dtype.

    On jax the dot asks for float32 results (`preferred_element_type`): for
    half-precision operands that reaches XLA's fast bfloat16 CPU kernel,
    where a dot returning bfloat16 takes a slow path (on an AVX512-BF16
    EPYC a (2048, 384) @ (384, 1536) matmul took 7.3 against 17.1 ms, and
    13.2 in float32: `benchmarks/jax_dot_speed.py`). The products of
    half-precision numbers are exact in float32, so both are the same matmul
    up to summation order. Elsewhere (the model code calls it on jax only)
    the operands are cast to float32.

    Examples:

    >>> a = keras.ops.ones((2, 3), "bfloat16")
    >>> out = matmul_in_float32(a, keras.ops.ones((3, 4), "bfloat16"))
    >>> keras.backend.standardize_dtype(out.dtype), float(out[0, 0])
    ('float32', 3.0)
    """
    if backend_name() == "jax":
        import jax.numpy as jnp

        if subscripts is None:
            return jnp.matmul(a, b, preferred_element_type=jnp.float32)
        return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)
    a, b = cast(a, "float32"), cast(b, "float32")
    return ops.matmul(a, b) if subscripts is None else ops.einsum(subscripts, a, b)


def _torch_tensor(x):
    import torch

    return x if isinstance(x, torch.Tensor) else ops.convert_to_tensor(x)


def _tf_linear(x, kernel, bias, activation):
    """`linear` on tensorflow: a 2D matmul, `bias_add` and GELU, which
    grappler's remapper fuses into one oneDNN op."""
    import tensorflow as tf

    out = tf.nn.bias_add(tf.matmul(tf.reshape(x, (-1, kernel.shape[0])), kernel), bias)
    if activation is not None:
        out = tf.nn.gelu(out, approximate=True)
    if x.shape[:-1].is_fully_defined():  # a constant shape: one op, not four
        return tf.reshape(out, x.shape[:-1] + [kernel.shape[1]])
    return tf.reshape(out, tf.concat([tf.shape(x)[:-1], [kernel.shape[1]]], 0))
