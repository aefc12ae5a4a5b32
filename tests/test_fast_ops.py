"""The backend fast paths (`utils.fast_ops`) against plain Keras and numpy."""

import contextlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.utils import cpu_kernels, fast_ops

RNG = np.random.default_rng(0)


def _normal(*shape):
    return RNG.standard_normal(shape).astype("float32")


def test_linear_equals_the_dense_layer():
    layer = keras.layers.Dense(6)
    x = _normal(2, 3, 4)
    layer.build(x.shape)
    layer.bias.assign(_normal(6))
    np.testing.assert_allclose(
        ops.convert_to_numpy(fast_ops.linear(layer, x)),
        ops.convert_to_numpy(layer(x)),
        atol=1e-5,
    )


def _torch_cpu_facts():
    """(AVX-512, oneDNN bfloat16 kernels) as torch reports them."""
    import torch

    return (
        torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
        bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    )


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
@pytest.mark.parametrize(
    "inference, dtype, onednn_float32_max, cpu",
    [
        (False, "float32", 2**20, "this"),
        (True, "float32", 2**20, "this"),
        (True, "float32", 0, "this"),
        (True, "float32", 0, "this, MKL on a non-Intel CPU"),
        (True, "bfloat16", 0, "this"),
        (True, "float32", 2**20, "avx2"),
        (True, "bfloat16", 0, "avx2"),
    ],
)
def test_linear_equals_dense_then_activation_on_every_kernel_path(
    inference, dtype, onednn_float32_max, cpu, activation, monkeypatch
):
    # On torch, inference (no gradient recorded) takes oneDNN's matmul, with
    # the GELU as a post-op, in bfloat16 where oneDNN has bfloat16 kernels,
    # and for small float32 kernels on AVX-512 CPUs; otherwise addmm (then
    # GELU in place). A threshold of 0 makes every float32 kernel large.
    # Training takes addmm (then GELU). "avx2" makes this CPU look like one
    # with neither AVX-512 nor bfloat16 kernels (oneDNN cannot even build a
    # bfloat16 primitive there); with MKL on a non-Intel CPU float32 kernels
    # of any size take oneDNN. All must match Dense.
    monkeypatch.setattr(cpu_kernels, "ONEDNN_FLOAT32_MAX_KERNEL", onednn_float32_max)
    mkl_elsewhere = cpu.endswith("non-Intel CPU")
    monkeypatch.setattr(cpu_kernels, "mkl_on_non_intel_cpu", lambda: mkl_elsewhere)
    layer = keras.layers.Dense(7, dtype=dtype)
    x = _normal(2, 5, 4)
    layer.build(x.shape)
    layer.bias.assign(_normal(7))
    want = layer(x)
    if activation is not None:
        want = ops.gelu(want, approximate=True)
    want = ops.convert_to_numpy(ops.cast(want, "float32"))
    context = contextlib.nullcontext()
    onednn_calls = []
    torch_inference = inference and keras.backend.backend() == "torch"
    if torch_inference:
        import torch

        avx512, bfloat16_kernels = _torch_cpu_facts()
        if cpu == "avx2":
            avx512 = bfloat16_kernels = False
            monkeypatch.setattr(cpu_kernels, "cpu_has_avx512", lambda: False)
            monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: False)
        context = torch.no_grad()
        onednn = torch.ops.mkldnn._linear_pointwise

        def counting(*args):
            onednn_calls.append(args[3])  # the post-op
            return onednn(*args)

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    with context:
        got = fast_ops.linear(layer, x, activation)
    if torch_inference:
        float32_pays = dtype == "float32" and (
            onednn_float32_max >= 4 * 7 or mkl_elsewhere
        )
        onednn_expected = (float32_pays and avx512) or (
            dtype == "bfloat16" and bfloat16_kernels
        )
        post_op = "none" if activation is None else "gelu"
        assert onednn_calls == [post_op] * int(onednn_expected)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    got = ops.convert_to_numpy(ops.cast(got, "float32"))
    # bfloat16: a few ulps (1/128 relative) apart from Keras' own rounding.
    tolerance = dict(atol=1e-5) if dtype == "float32" else dict(atol=3e-2, rtol=2e-2)
    np.testing.assert_allclose(got, want, **tolerance)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("bfloat16_kernels", ["this cpu", "none"])
def test_bfloat16_linear_matches_dense_with_or_without_bfloat16_kernels(
    bfloat16_kernels, use_bias, activation, monkeypatch, record_dtypes
):
    # Where oneDNN has no bfloat16 kernels (an AVX2 CPU), torch's bfloat16
    # matmuls are generic code, 10-50x slower than float32; `linear` then
    # multiplies in float32 and returns bfloat16. "none" makes this CPU look
    # like such a one.
    if bfloat16_kernels == "none":
        monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: False)
    layer = keras.layers.Dense(7, use_bias=use_bias, dtype="bfloat16")
    x = _normal(2, 5, 4)
    layer.build(x.shape)
    if use_bias:
        layer.bias.assign(_normal(7))
    want = layer(x)
    if activation is not None:
        want = ops.gelu(want, approximate=True)
    context = contextlib.nullcontext()
    on_torch = keras.backend.backend() == "torch"
    if on_torch:
        import torch

        context = torch.no_grad()
        addmm_dtypes = record_dtypes(torch, "addmm")
        mm_dtypes = record_dtypes(torch, "mm")
        # AVX-512 CPUs take oneDNN's matmul for small float32 kernels.
        fused_dtypes = record_dtypes(torch.ops.mkldnn, "_linear_pointwise")
    with context:
        got = fast_ops.linear(layer, x, activation)
    assert keras.backend.standardize_dtype(got.dtype) == "bfloat16"
    if on_torch and bfloat16_kernels == "none":
        assert addmm_dtypes + mm_dtypes + fused_dtypes == [torch.float32]
        assert cpu_kernels.emulated_bfloat16(got)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(got, "float32")),
        ops.convert_to_numpy(ops.cast(want, "float32")),
        atol=3e-2,
        rtol=2e-2,  # a few bfloat16 ulps apart from Keras' own rounding
    )


def test_linear_in_a_tensorflow_graph_with_unknown_shapes_and_gradients():
    # tensorflow flattens to a 2D matmul with its bias (and GELU) for
    # grappler to fuse; the reshapes must hold for unknown batch and token
    # axes, and training must see the same gradients as the Dense layer's.
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tensorflow's graph path; other backends run it eagerly above")
    import tensorflow as tf

    layer = keras.layers.Dense(7)
    layer.build((None, None, 4))
    layer.bias.assign(_normal(7))
    x = tf.constant(_normal(2, 5, 4))

    def grads(fn, x):
        with tf.GradientTape() as tape:
            out = fn(x)
            loss = tf.reduce_sum(out * out)
        return out, tape.gradient(loss, [layer.kernel.value, layer.bias.value])

    spec = [tf.TensorSpec((None, None, 4))]
    fast = tf.function(
        lambda x: grads(lambda x: fast_ops.linear(layer, x, "gelu_tanh"), x),
        input_signature=spec,
    )
    got, got_grads = fast(x)
    want, want_grads = grads(lambda x: ops.gelu(layer(x), approximate=True), x)
    assert tuple(got.shape) == (2, 5, 7)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_linear_rejects_unknown_activation():
    layer = keras.layers.Dense(2)
    with pytest.raises(ValueError, match="gelu_tanh"):
        fast_ops.linear(layer, _normal(1, 3), "relu")


def test_cast_converts_and_skips_no_op_casts():
    x = ops.ones((3,), "float32")
    assert fast_ops.cast(x, "float32") is x or keras.backend.backend() == "jax"
    half = fast_ops.cast(x, "bfloat16")
    assert keras.backend.standardize_dtype(half.dtype) == "bfloat16"
    variable = keras.Variable(np.ones((2,), "float32"))
    assert (
        keras.backend.standardize_dtype(fast_ops.cast(variable, "float16").dtype)
        == "float16"
    )


def test_cast_to_a_non_float_dtype_takes_keras_cast():
    x = ops.convert_to_tensor(np.array([1.7, -2.2], "float32"))
    got = fast_ops.cast(x, "int32")
    assert keras.backend.standardize_dtype(got.dtype) == "int32"
    assert ops.convert_to_numpy(got).tolist() == [1, -2]


def test_affine_and_chunks_follow_their_formulas():
    x, kernel, bias = _normal(2, 3, 4), _normal(4, 6), _normal(6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(fast_ops.affine(x, kernel, bias)),
        x @ kernel + bias,
        atol=1e-5,
    )
    parts = fast_ops.chunks(ops.convert_to_tensor(x @ kernel), 3)
    want = np.split(x @ kernel, 3, axis=-1)
    assert len(parts) == 3
    for got, expected in zip(parts, want):
        np.testing.assert_allclose(ops.convert_to_numpy(got), expected, atol=1e-5)


class _CountingDense(keras.layers.Dense):
    """A Dense layer that counts how often Keras' `__call__` runs."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def test_call_layer_matches_the_layer_and_skips_keras_call_only_on_torch():
    layer = _CountingDense(3)
    x = ops.convert_to_tensor(_normal(2, 4))
    want = ops.convert_to_numpy(layer(x))  # builds it
    _CountingDense.calls = 0
    got = ops.convert_to_numpy(fast_ops.call_layer(layer, x))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert _CountingDense.calls == (0 if keras.backend.backend() == "torch" else 1)
    # Unbuilt layers and symbolic inputs (functional models) take __call__.
    fresh = _CountingDense(5)
    assert tuple(fast_ops.call_layer(fresh, x).shape) == (2, 5) and fresh.built
    symbolic = fast_ops.call_layer(layer, keras.Input((4,)))
    assert isinstance(symbolic, keras.KerasTensor)
    assert _CountingDense.calls == (2 if keras.backend.backend() == "torch" else 3)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(fast_ops)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_jax_half_precision_linear_asks_for_float32_dot_results(
    activation, dot_result_dtypes
):
    # XLA's fast bfloat16 CPU dot is the one that returns float32; a dot
    # returning bfloat16 takes a path ~1.7x slower (`fast_ops.matmul_in_float32`).
    if keras.backend.backend() != "jax":
        pytest.skip("a jax dot's result type; other backends sum in float32")
    layer = keras.layers.Dense(7, dtype="bfloat16")
    x = ops.cast(_normal(2, 5, 4), "bfloat16")
    layer.build(x.shape)
    assert dot_result_dtypes(lambda x: fast_ops.linear(layer, x, activation), x) == [
        "float32"
    ]
    assert keras.backend.standardize_dtype(fast_ops.linear(layer, x).dtype) == (
        "bfloat16"
    )


def test_matmul_in_float32_sums_half_precision_operands_in_float32():
    a = ops.cast(_normal(3, 5), "bfloat16")
    b = ops.cast(_normal(5, 2), "bfloat16")
    want = ops.convert_to_numpy(ops.cast(a, "float32")) @ ops.convert_to_numpy(
        ops.cast(b, "float32")
    )
    got = fast_ops.matmul_in_float32(a, b)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    # Products of bfloat16 numbers are exact in float32; only the order of
    # summation differs (bfloat16 results would be ~1e-2 off).
    np.testing.assert_allclose(ops.convert_to_numpy(got), want, atol=1e-5)
    got = fast_ops.matmul_in_float32(a, b, "ik,kj->ij")
    np.testing.assert_allclose(ops.convert_to_numpy(got), want, atol=1e-5)
