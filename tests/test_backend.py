"""`utils.backend`: compiled functions, their rewrites and memory, loops."""

import keras
import numpy as np
import pytest
from keras import ops


def test_compiled_functions_release_freed_memory_after_each_compile(monkeypatch):
    from keras_diffusion.utils import backend

    released = []
    monkeypatch.setattr(backend, "release_freed_memory", lambda: released.append(1))
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    double = backend.compile_function(lambda x: layer(x) * 2.0, layer.variables)
    small, large = np.ones((2, 4), "float32"), np.ones((5, 4), "float32")
    first = double(small)
    again = double(small)
    # Compiling backends trace once per new argument shape or dtype; torch
    # runs eagerly and compiles nothing.
    compiles = backend.backend_name() != "torch"
    assert len(released) == (1 if compiles else 0)
    double(large)
    double(small.astype("float16"))
    double(large)
    assert len(released) == (3 if compiles else 0)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(first), ops.convert_to_numpy(again)
    )
    expected = ops.convert_to_numpy(layer(small)) * 2.0
    np.testing.assert_allclose(ops.convert_to_numpy(first), expected, rtol=1e-6)
    if backend.backend_name() == "tensorflow":  # the tf.function stays reachable
        assert double.__wrapped__.experimental_get_tracing_count() == 3


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="grappler's graph rewrites exist only on tensorflow",
)
@pytest.mark.parametrize("passes", [1, 2])
def test_tensorflow_calls_run_with_lighter_rewrites_and_restore_the_thread(
    monkeypatch, passes
):
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    from keras_diffusion.utils import backend

    seen = []
    original = context.Context.call_function

    def spy(self, name, inputs, num_outputs):
        config = config_pb2.ConfigProto()
        config.ParseFromString(self.function_call_options.config_proto_serialized)
        seen.append(config.graph_options.rewrite_options)
        return original(self, name, inputs, num_outputs)

    monkeypatch.setattr(context.Context, "call_function", spy)
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    before = context.context().function_call_options
    double = backend.compile_function(
        lambda x: layer(x) * 2.0, layer.variables, rewrite_passes=passes
    )
    x = np.arange(8, dtype="float32").reshape(2, 4)
    out = double(x)

    assert len(seen) == 1
    rewrites, enums = seen[0], rewriter_config_pb2.RewriterConfig
    assert rewrites.layout_optimizer == enums.OFF
    assert rewrites.memory_optimization == enums.NO_MEM_OPT
    assert rewrites.disable_tfg_optimizer
    assert rewrites.meta_optimizer_iterations == (enums.ONE, enums.TWO)[passes - 1]
    # Only the call saw them: the thread's options are the ones it had.
    assert context.context().function_call_options is before
    np.testing.assert_array_equal(
        ops.convert_to_numpy(out), ops.convert_to_numpy(layer(x)) * 2.0
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="grappler's graph rewrites exist only on tensorflow",
)
def test_tensorflow_keeps_its_default_rewrites_where_a_gpu_is_visible(monkeypatch):
    import tensorflow as tf
    from tensorflow.python.eager import context

    from keras_diffusion.utils import backend

    current = context.context().function_call_options
    assert backend._tf_rewrite_options(current, 1) is not None  # CPU only here
    gpu = tf.config.LogicalDevice(name="/device:GPU:0", device_type="GPU")
    monkeypatch.setattr(
        tf.config, "list_logical_devices", lambda kind=None: [gpu] * (kind == "GPU")
    )
    assert backend._tf_rewrite_options(current, 1) is None


def test_sequential_fori_loop_matches_fori_loop_compiled_and_eager():
    from keras_diffusion.utils.backend import compile_function, sequential_fori_loop

    def body(i, x):  # depends on the index and on the order of iterations
        return x * 1.5 + ops.cast(i, "float32")

    def run(loop):
        return lambda x, start, end: loop(start, end, body, ops.convert_to_tensor(x))

    x = np.array([1.0, -2.0], "float32")
    start, end = np.int32(2), np.int32(7)
    expected = x.copy()
    for i in range(2, 7):
        expected = expected * 1.5 + i
    for loop in (sequential_fori_loop, ops.fori_loop):
        eager = ops.convert_to_numpy(run(loop)(x, start, end))
        compiled = ops.convert_to_numpy(compile_function(run(loop), [])(x, start, end))
        np.testing.assert_allclose(eager, expected, rtol=1e-6)
        np.testing.assert_array_equal(compiled, eager)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only tensorflow's while_loop runs iterations in parallel",
)
def test_sequential_fori_loop_is_one_iteration_at_a_time_on_tensorflow():
    import tensorflow as tf

    from keras_diffusion.utils.backend import sequential_fori_loop

    def while_ops(loop):
        fn = tf.function(lambda x: loop(0, 3, lambda i, v: v * 2.0, x), autograph=False)
        graph = fn.get_concrete_function(tf.TensorSpec([2], "float32")).graph
        return [
            op.get_attr("parallel_iterations")
            for op in graph.get_operations()
            if op.type in ("While", "StatelessWhile")
        ]

    assert while_ops(sequential_fori_loop) == [1]
    # What it replaces: Keras' loop lets tensorflow start up to 10 at once.
    assert while_ops(ops.fori_loop) == [10]


def test_a_function_left_untraced_runs_eagerly_on_tensorflow_only():
    from keras_diffusion.utils.backend import compile_function

    variable = keras.Variable(np.full((2,), 3.0, "float32"))
    seen = []

    def fn(x):
        seen.append(_is_concrete(x))
        return x * variable

    compiled = compile_function(fn, [variable], trace_on_tensorflow=False)
    out = compiled(np.ones((2,), "float32"))
    np.testing.assert_array_equal(ops.convert_to_numpy(out), 3.0)
    # tensorflow: eager values; jax still traces (jit); torch runs eagerly.
    assert seen == [keras.backend.backend() != "jax"]


def _is_concrete(x):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    return True
