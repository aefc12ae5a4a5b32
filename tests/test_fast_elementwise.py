"""The element-wise fast paths (`utils.fast_elementwise`) against plain Keras
and numpy."""

import contextlib
import doctest

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.utils import fast_elementwise

RNG = np.random.default_rng(1)


def _normal(*shape):
    return RNG.standard_normal(shape).astype("float32")


def test_modulate_and_gated_residual_follow_their_formulas():
    x, update = _normal(2, 5, 4), _normal(2, 5, 4)
    shift, scale, gate = _normal(2, 4), _normal(2, 4), _normal(2, 4)
    got = ops.convert_to_numpy(fast_elementwise.modulate(x, shift, scale))
    np.testing.assert_allclose(
        got, x * (1 + scale[:, None]) + shift[:, None], rtol=1e-6, atol=1e-6
    )
    update_bf16 = ops.cast(update, "bfloat16")  # a low-precision branch output
    got = fast_elementwise.gated_residual(x, gate, update_bf16)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    rounded = ops.convert_to_numpy(ops.cast(update_bf16, "float32"))
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), x + gate[:, None] * rounded, rtol=1e-6, atol=1e-6
    )


def test_silu_and_residual_add_follow_their_formulas():
    x, update = _normal(2, 3, 4), _normal(2, 3, 4)
    for overwrite in (False, True):
        got = fast_elementwise.silu(ops.convert_to_tensor(x), overwrite=overwrite)
        expected = x / (1 + np.exp(-x))
        np.testing.assert_allclose(ops.convert_to_numpy(got), expected, rtol=1e-6)
    update_bf16 = ops.cast(update, "bfloat16")
    got = fast_elementwise.residual_add(ops.convert_to_tensor(x), update_bf16)
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    rounded = ops.convert_to_numpy(ops.cast(update_bf16, "float32"))
    np.testing.assert_allclose(ops.convert_to_numpy(got), x + rounded, rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch writes in place")
def test_overwriting_is_in_place_only_where_no_gradient_flows():
    import torch

    with torch.no_grad():
        x = torch.randn(2, 3)
        assert fast_elementwise.silu(x, overwrite=True).data_ptr() == x.data_ptr()
        update = torch.randn(2, 3)
        assert fast_elementwise.residual_add(x, update).data_ptr() == update.data_ptr()
    # With autograd through them, both allocate and the gradients are right.
    x = torch.randn(2, 3, requires_grad=True)
    h = x * 1.0
    y = fast_elementwise.silu(h, overwrite=True)
    assert y.data_ptr() != h.data_ptr()
    base = torch.randn(2, 3)
    total = fast_elementwise.residual_add(base, y)
    assert total.data_ptr() != y.data_ptr()
    total.sum().backward()
    sig = torch.sigmoid(x.detach())
    torch.testing.assert_close(x.grad, sig * (1 + x.detach() * (1 - sig)))


@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_norm_modulate_follows_its_formula_per_batch_item(inference, dtype):
    # On torch, inference takes one affine layer norm per batch item; the
    # other paths take layer_norm, modulate and a cast. Both against numpy.
    x = 3.0 + _normal(3, 5, 8)
    shift, scale = _normal(3, 8), _normal(3, 8)
    mean = x.mean(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    want = normed * (1.0 + scale[:, None]) + shift[:, None]
    context = contextlib.nullcontext()
    if inference and keras.backend.backend() == "torch":
        import torch

        context = torch.no_grad()
    with context:
        got = fast_elementwise.norm_modulate(x, shift, scale, 1e-6, dtype)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    got = ops.convert_to_numpy(ops.cast(got, "float32"))
    # bfloat16 keeps 8 significant bits: half an ulp is 2**-9 relative.
    rtol = 1e-5 if dtype == "float32" else 2**-8
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=rtol)


def test_layer_norm_equals_keras_and_keeps_large_offset_variance():
    x = _normal(2, 5, 16) * 3.0 + 100.0
    got = ops.convert_to_numpy(fast_elementwise.layer_norm(x, 1e-6))
    want = ops.convert_to_numpy(ops.layer_normalization(x, axis=-1, epsilon=1e-6))
    np.testing.assert_allclose(got, want, atol=2e-4)
    x64 = x.astype("float64")
    centred = x64 - x64.mean(-1, keepdims=True)
    reference = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, reference, atol=2e-4)
    half = fast_elementwise.layer_norm(ops.cast(x, "bfloat16"), 1e-6)
    assert keras.backend.standardize_dtype(half.dtype) == "float32"


@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 8)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_normalization_equals_the_keras_layer(shape, dtype):
    layer = keras.layers.LayerNormalization(epsilon=1e-5, dtype=dtype)
    layer.build(shape)
    layer.gamma.assign(_normal(8))
    layer.beta.assign(_normal(8))
    x = _normal(*shape)
    got, want = fast_elementwise.layer_normalization(layer, x), layer(x)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(got, "float32")),
        ops.convert_to_numpy(ops.cast(want, "float32")),
        atol=1e-5 if dtype == "float32" else 5e-2,
    )


def test_layer_norm_gradients_in_a_tensorflow_graph():
    # The tensorflow path writes the norm out; training must see the same
    # gradients as Keras' op.
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tensorflow's written-out norm; other backends call Keras' op")
    import tensorflow as tf

    x = tf.constant(_normal(2, 5, 8) * 2.0 + 1.0)
    weights = tf.constant(_normal(2, 5, 8))

    def grad(norm, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(norm(x) * weights)
        return tape.gradient(loss, x)

    fast = tf.function(
        lambda x: grad(lambda y: fast_elementwise.layer_norm(y, 1e-6), x),
        input_signature=[tf.TensorSpec((None, None, 8))],
    )
    want = grad(lambda y: ops.layer_normalization(y, axis=-1, epsilon=1e-6), x)
    np.testing.assert_allclose(fast(x).numpy(), want.numpy(), atol=1e-5)


def test_docstring_examples_run():
    result = doctest.testmod(fast_elementwise)
    assert result.attempted > 0 and result.failed == 0
