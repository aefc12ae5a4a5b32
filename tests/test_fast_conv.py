"""The VAE's fast paths (`utils.fast_conv`) against plain Keras and numpy."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.utils import cpu_kernels, fast_conv

RNG = np.random.default_rng(0)


def _normal(*shape):
    return RNG.standard_normal(shape).astype("float32")


@pytest.mark.parametrize(
    "kernel_size, strides, padding",
    [(3, 1, "same"), (1, 1, "same"), (3, 2, "valid"), (3, 1, "valid"), (2, 2, "same")],
)
def test_conv2d_equals_the_keras_layer(kernel_size, strides, padding):
    layer = keras.layers.Conv2D(5, kernel_size, strides=strides, padding=padding)
    x = _normal(2, 9, 7, 3)
    layer.build(x.shape)
    layer.bias.assign(_normal(5))
    got = ops.convert_to_numpy(fast_conv.conv2d(layer, x))
    want = ops.convert_to_numpy(layer(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_conv2d_output_is_channels_last_and_contiguous():
    layer = keras.layers.Conv2D(4, 3, padding="same")
    out = fast_conv.conv2d(layer, _normal(1, 8, 8, 6))
    assert tuple(out.shape) == (1, 8, 8, 4)
    if keras.backend.backend() == "torch":
        # A channels-last view: no copy is needed by the next layer.
        assert out.is_contiguous()


@pytest.mark.parametrize(
    "kernel_size, padding, bias",
    [(3, "same", True), (3, "same", False), (1, "same", True), (3, "valid", True)],
)
def test_upsample_conv2d_equals_the_layer_on_the_upsampled_input(
    kernel_size, padding, bias
):
    # 3x3 "same" runs as the phase-split 2x2 convolution; others fall back.
    layer = keras.layers.Conv2D(6, kernel_size, padding=padding, use_bias=bias)
    x = _normal(2, 5, 7, 3)
    layer.build((None, None, None, 3))
    layer.kernel.assign(_normal(*layer.kernel.shape))
    if bias:
        layer.bias.assign(_normal(6))
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    got = ops.convert_to_numpy(fast_conv.upsample_conv2d(layer, x))
    want = ops.convert_to_numpy(layer(up))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_upsample_conv2d_leaves_no_tensor_in_reference_cycles():
    # A tensor held by a reference cycle stays resident until Python's cycle
    # collector runs (on torch, Keras' tree utilities made such cycles of
    # the interleave's slices, views of the whole convolution output).
    import gc

    layer = keras.layers.Conv2D(4, 3, padding="same")
    x = ops.convert_to_tensor(_normal(1, 16, 16, 3))
    fast_conv.upsample_conv2d(layer, x)  # builds the layer
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        out = fast_conv.upsample_conv2d(layer, x)
        assert tuple(out.shape) == (1, 32, 32, 4)
        del out
        gc.collect()
        held = [o for o in gc.garbage if ops.is_tensor(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert held == []


def test_upsample_conv2d_traces_with_unknown_spatial_sizes():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("unknown static shapes exist in tensorflow graphs only")
    import tensorflow as tf

    layer = keras.layers.Conv2D(4, 3, padding="same")
    layer.build((None, None, None, 2))
    fn = tf.function(
        lambda x: fast_conv.upsample_conv2d(layer, x),
        input_signature=[tf.TensorSpec((None, None, None, 2), "float32")],
    )
    x = _normal(1, 3, 4, 2)
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(fn(x).numpy(), layer(up).numpy(), atol=1e-5)


def test_bfloat16_conv2d_without_bfloat16_kernels_runs_in_float32(
    monkeypatch, record_dtypes
):
    # Where oneDNN has no bfloat16 kernels (an AVX2 CPU), torch's bfloat16
    # convolution is generic code: it runs in float32 and returns bfloat16.
    monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: False)
    layer = keras.layers.Conv2D(4, 3, padding="same", dtype="bfloat16")
    x = _normal(1, 8, 8, 6)
    layer.build(x.shape)
    layer.bias.assign(_normal(4))
    want = ops.convert_to_numpy(ops.cast(layer(x), "float32"))
    if keras.backend.backend() == "torch":
        import torch

        kernel_dtypes = record_dtypes(torch.nn.functional, "conv2d")
    out = fast_conv.conv2d(layer, x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    if keras.backend.backend() == "torch":
        assert kernel_dtypes == [torch.float32]
    got = ops.convert_to_numpy(ops.cast(out, "float32"))
    np.testing.assert_allclose(got, want, atol=6e-2, rtol=2e-2)


def _group_norm_reference(x, groups, gamma, beta, epsilon):
    b, h, w, c = x.shape
    g = x.astype("float64").reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    normed = ((g - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    return normed * gamma + beta


def test_group_norm_matches_numpy_on_large_offset_activations():
    # VAE decoder activations can sit far from zero; one-pass statistics
    # (E[x^2] - E[x]^2) would lose the variance in float32.
    x = _normal(2, 6, 5, 8) * 3.0 + 1000.0
    gamma, beta = _normal(8), _normal(8)
    got = ops.convert_to_numpy(fast_conv.group_norm(x, 4, gamma, beta, 1e-6))
    np.testing.assert_allclose(
        got, _group_norm_reference(x, 4, gamma, beta, 1e-6), atol=2e-4
    )


@pytest.mark.parametrize("onednn", [False, True])
def test_half_precision_group_norm_is_accurate_and_keeps_its_dtype(onednn, monkeypatch):
    # A bfloat16 VAE activation far from zero: the statistics are float32
    # arithmetic (centred on a bfloat16 mean), so the result is as good as
    # bfloat16 output allows, measured against float64 on the same input.
    # tensorflow keeps bfloat16 only where oneDNN's matmuls sum in float32.
    backend = keras.backend.backend()
    if onednn and not (backend == "tensorflow" and cpu_kernels.tf_onednn_bfloat16()):
        pytest.skip("tensorflow with oneDNN only; the other case runs everywhere")
    if backend == "tensorflow":
        monkeypatch.setattr(fast_conv, "tf_onednn_bfloat16", lambda: onednn)
    x = ops.cast(_normal(2, 6, 5, 8) * 3.0 + 100.0, "bfloat16")
    gamma, beta = _normal(8), _normal(8)
    out = fast_conv.group_norm(x, 4, gamma, beta, 1e-6)
    keeps = backend == "torch" or onednn
    expected_dtype = "bfloat16" if keeps else "float32"
    assert keras.backend.standardize_dtype(out.dtype) == expected_dtype
    rounded = ops.convert_to_numpy(ops.cast(x, "float32"))
    want = _group_norm_reference(rounded, 4, gamma, beta, 1e-6)
    got = ops.convert_to_numpy(ops.cast(out, "float32"))
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=1e-2)
    assert np.abs(want).max() > 1.0  # a real normalisation, not all zeros


def test_group_norm_in_a_tensorflow_graph_with_unknown_shapes_and_gradients():
    # tensorflow's per-channel means are a matmul with a 1/n row whose
    # length must come from the dynamic pixel count.
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tensorflow's matmul statistics; other backends run above")
    import tensorflow as tf

    x = tf.constant(_normal(2, 6, 5, 8) * 2.0 + 3.0)
    gamma, beta = _normal(8), _normal(8)
    weights = tf.constant(_normal(2, 6, 5, 8))

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = fast_conv.group_norm(x, 4, gamma, beta, 1e-6)
            loss = tf.reduce_sum(out * weights)
        return out, tape.gradient(loss, x)

    graph = tf.function(grad, input_signature=[tf.TensorSpec((None, None, None, 8))])
    out, got = graph(x)
    np.testing.assert_allclose(
        out.numpy(), _group_norm_reference(x.numpy(), 4, gamma, beta, 1e-6), atol=2e-4
    )
    # The gradient of the two-pass formula, written with plain reductions.
    with tf.GradientTape() as tape:
        tape.watch(x)
        g = tf.reshape(x, (2, -1, 4, 2))
        centred = g - tf.reduce_mean(g, axis=(1, 3), keepdims=True)
        variance = tf.reduce_mean(tf.square(centred), axis=(1, 3), keepdims=True)
        normed = tf.reshape(centred * tf.math.rsqrt(variance + 1e-6), x.shape)
        loss = tf.reduce_sum((normed * gamma + beta) * weights)
    np.testing.assert_allclose(got.numpy(), tape.gradient(loss, x).numpy(), atol=1e-4)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(fast_conv)
    assert result.attempted > 0 and result.failed == 0
