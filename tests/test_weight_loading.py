"""`utils.weight_loading`: building models for loading, assigning arrays."""

import doctest
import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.utils.weight_loading import (
    adopt_array,
    assign_array,
    loading_weights,
)


class Noisy(keras.layers.Layer):
    """A Dense layer plus a seed generator, whose state must keep its seed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3, bias_initializer="ones")
        self.seed_generator = keras.random.SeedGenerator(7)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(x)


def _build():
    layer = Noisy()
    layer.build((None, 4))
    return layer


def test_random_initializers_are_skipped_and_loaded_values_are_used():
    kernel = np.arange(12, dtype="float32").reshape(4, 3)
    with loading_weights() as build:
        layer = build(_build)
        if keras.backend.backend() != "jax":
            # The bias keeps its constant initializer (the glorot kernel's
            # memory is only allocated: `test_..._writes_no_page`).
            np.testing.assert_array_equal(ops.convert_to_numpy(layer.dense.bias), 1)
        assign_array(layer.dense.kernel, kernel)
    out = ops.convert_to_numpy(layer(np.ones((1, 4), "float32")))
    np.testing.assert_allclose(out, kernel.sum(0, keepdims=True) + 1)
    # The seed state keeps its seed, as in a model built the usual way.
    fresh = _build()
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.seed_generator.state),
        ops.convert_to_numpy(fresh.seed_generator.state),
    )
    assert keras.backend.standardize_dtype(layer.dense.kernel.dtype) == "float32"


def test_variables_left_unassigned_on_jax_get_their_initializer_on_exit():
    if keras.backend.backend() != "jax":
        pytest.skip("off jax every variable holds a value from the start")
    with loading_weights() as build:
        layer = build(_build)
        assert layer.dense.kernel._value is None  # deferred: nothing computed
    kernel = ops.convert_to_numpy(layer.dense.kernel)
    assert kernel.shape == (4, 3) and np.abs(kernel).max() > 0


def test_a_failed_load_leaves_no_pending_variables_behind():
    from keras.src.backend.common import global_state

    before = list(global_state.get_global_attribute("uninitialized_variables") or [])
    with pytest.raises(RuntimeError, match="corrupt"):
        with loading_weights() as build:
            build(_build)
            raise RuntimeError("corrupt weights file")
    after = global_state.get_global_attribute("uninitialized_variables") or []
    assert len(after) == len(before)
    # A model built afterwards, outside the block, initializes as usual.
    kernel = ops.convert_to_numpy(_build().dense.kernel)
    assert np.abs(kernel).max() > 0


def test_loading_on_jax_casts_on_the_host_and_compiles_nothing(caplog):
    # Keras' jax conversion casts a file's float32 value on the device: a
    # compiled XLA program per weight shape. While loading, the cast is numpy's.
    if keras.backend.backend() != "jax":
        pytest.skip("jax compiles its casts; the other backends run them eagerly")
    import jax

    kernel = np.linspace(-2, 2, 12, dtype="float32").reshape(4, 3)
    bias = np.float32([0.1, 0.2, 0.3])
    with loading_weights() as build:
        layer = build(_bfloat16_dense)
        with jax.log_compiles(), caplog.at_level("WARNING"):
            layer.kernel.assign(kernel)
            layer.bias.assign(bias)
        # "Compiling ..." is logged before the persistent cache is consulted.
        compiled = [r for r in caplog.records if "compil" in r.getMessage().lower()]
        assert compiled == []
    for variable, value in ((layer.kernel, kernel), (layer.bias, bias)):
        assert "_convert_to_tensor" not in vars(variable)  # the class's again
        assert keras.backend.standardize_dtype(variable.dtype) == "bfloat16"
        want = ops.convert_to_numpy(ops.cast(value, "bfloat16"))
        np.testing.assert_array_equal(ops.convert_to_numpy(variable.value), want)


def _bfloat16_dense():
    layer = keras.layers.Dense(3, dtype="bfloat16")
    layer.build((None, 4))
    return layer


def test_two_models_built_in_one_loading_block_both_load():
    kernels = [np.full((4, 3), value, "float32") for value in (1.0, 2.0)]
    with loading_weights() as build:
        layers = [build(_bfloat16_dense), build(_bfloat16_dense)]
        for layer, kernel in zip(layers, kernels):
            layer.kernel.assign(kernel)
            layer.bias.assign(np.zeros(3, "float32"))
    for layer, kernel in zip(layers, kernels):
        assert "_convert_to_tensor" not in vars(layer.kernel)
        got = ops.convert_to_numpy(ops.cast(layer.kernel.value, "float32"))
        np.testing.assert_array_equal(got, kernel)


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux only")
def test_building_for_loading_writes_no_page_of_a_skipped_initializer():
    # A random initial value that the load overwrites is not even filled: its
    # pages stay unwritten, so building does not grow the resident set.
    if keras.backend.backend() == "jax":
        pytest.skip("on jax the variables hold nothing until assigned")
    size = 2**24  # 64 MB of float32, allocated straight from the system

    def big_dense():
        layer = keras.layers.Dense(size // 1024)
        layer.build((None, 1024))
        return layer

    with loading_weights() as build:
        before = _resident_bytes()
        layer = build(big_dense)
        grown = _resident_bytes() - before
        assert tuple(layer.kernel.shape) == (1024, size // 1024)
        assert grown < size // 4, f"building wrote {grown / 2**20:.0f} MB"
        assign_array(layer.kernel, np.ones((1024, size // 1024), "float32"))
        layer.bias.assign(np.zeros(size // 1024, "float32"))
    out = ops.convert_to_numpy(layer(np.ones((1, 1024), "float32")))
    np.testing.assert_array_equal(out, 1024)


@pytest.mark.parametrize("shape", [(37, 5, 3), (101,)])
def test_assign_array_in_slices_writes_every_row_in_place(monkeypatch, shape):
    from keras_diffusion.utils import weight_loading

    # Slices of a few rows each, and a last slice shorter than the others.
    monkeypatch.setattr(weight_loading, "ASSIGN_SLICE", 4 * int(np.prod(shape[1:])) * 4)
    values = np.arange(np.prod(shape), dtype="float32").reshape(shape)
    variable = keras.Variable(np.zeros(shape, "float32"))
    assign_array(variable, values)
    np.testing.assert_array_equal(ops.convert_to_numpy(variable), values)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tensorflow's variable modes"
)
def test_assign_array_in_slices_leaves_reads_uncopied(monkeypatch):
    # After a partial write, tensorflow copies a variable on every read
    # (copy-on-read) unless told otherwise: each step would copy the weights.
    import tensorflow as tf

    from keras_diffusion.utils import weight_loading

    monkeypatch.setattr(weight_loading, "ASSIGN_SLICE", 4 * 8 * 4)
    values = np.arange(64 * 8, dtype="float32").reshape(64, 8)
    variable = keras.Variable(np.zeros((64, 8), "float32"))
    assign_array(variable, values)
    reads = [
        tf.raw_ops.ReadVariableOp(resource=variable.value.handle, dtype=tf.float32)
        for _ in range(3)
    ]
    addresses = {np.from_dlpack(read).ctypes.data for read in reads}
    assert len(addresses) == 1
    np.testing.assert_array_equal(reads[0].numpy(), values)


def test_assign_array_returns_freed_memory_every_release_every_bytes(monkeypatch):
    from keras_diffusion.utils import weight_loading

    released = []
    monkeypatch.setattr(
        weight_loading, "release_freed_memory", lambda: released.append(1)
    )
    monkeypatch.setattr(weight_loading, "_assigned_bytes", 0)
    monkeypatch.setattr(weight_loading, "RELEASE_EVERY", 100)
    variable = keras.Variable(np.zeros((10,), "float32"))  # 40 bytes a write
    for value in range(5):
        assign_array(variable, np.full((10,), value, "float32"))
    # The third write reaches 120 >= 100 bytes: one release, then a fresh count.
    assert len(released) == 1
    assign_array(variable, np.full((10,), 5.0, "float32"))
    assert len(released) == 2
    np.testing.assert_array_equal(ops.convert_to_numpy(variable), 5.0)


def _aligned(values, offset_bytes=0):
    """A copy of `values` whose data starts `offset_bytes` past 64 bytes."""
    raw = np.zeros(values.nbytes + 128, "uint8")
    start = -raw.ctypes.data % 64 + offset_bytes
    out = raw[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adopt_array_shares_memory_on_tensorflow_and_torch(dtype):
    import ml_dtypes

    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    values = _aligned(np.arange(32, dtype="float32").reshape(4, 8).astype(numpy_dtype))
    variable = keras.Variable(np.zeros((4, 8), "float32"), dtype=dtype)
    adopted = adopt_array(variable, values)
    assert adopted == (keras.backend.backend() != "jax")
    if not adopted:
        return
    values[0, 0] = 100  # the variable reads the same memory
    out = ops.convert_to_numpy(ops.cast(variable, "float32"))
    np.testing.assert_array_equal(out.ravel()[1:], np.arange(1, 32))
    assert out[0, 0] == 100


def test_adopt_array_refuses_what_it_cannot_share():
    variable = keras.Variable(np.zeros((4, 16), "float32"))
    values = np.ones((4, 16), "float32")
    refused = [
        _aligned(values.astype("float64")),  # another dtype
        _aligned(values)[:, :8],  # not contiguous, another shape
        _aligned(np.ones((16, 4), "float32")),  # another shape
    ]
    read_only = _aligned(values)
    read_only.flags.writeable = False
    refused.append(read_only)
    if keras.backend.backend() == "tensorflow":
        # tensorflow aborts the process on foreign memory off 64 bytes.
        refused.append(_aligned(values, offset_bytes=16))
    for array in refused:
        assert not adopt_array(variable, array)
    np.testing.assert_array_equal(ops.convert_to_numpy(variable), 0.0)


def test_doctests():
    from keras_diffusion.utils import weight_loading

    result = doctest.testmod(weight_loading)
    assert result.attempted and not result.failed
