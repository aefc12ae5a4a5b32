"""`utils.shared_traces`: repeated layers traced once on tensorflow."""

import doctest
import functools

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.utils import shared_traces
from keras_diffusion.utils.backend import compile_function
from keras_diffusion.utils.shared_traces import layer_caller

TENSORFLOW = keras.backend.backend() == "tensorflow"


class CountingDense(keras.layers.Dense):
    """A Dense that counts how often its `call` runs in Python."""

    calls = 0

    def call(self, x):
        CountingDense.calls += 1
        return super().call(x)


def _stack(activations=("gelu",) * 4, lora=()):
    rng = np.random.default_rng(0)
    layers = []
    for i, activation in enumerate(activations):
        layer = CountingDense(4, activation=activation, name=f"layer_{i}")
        layer.build((None, 4))
        for v in layer.variables:
            v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
        if i in lora:
            layer.enable_lora(2)
            layer.lora_kernel_b.assign(np.full((2, 4), 0.5, "float32"))
        layers.append(layer)
    return layers


def _run(layers, shared):
    def fn(x):
        call = layer_caller() if shared else (lambda layer, x: layer(x))
        for layer in layers:
            x = call(layer, x)
        return x

    return compile_function(fn, [v for layer in layers for v in layer.variables])


def test_a_stack_of_alike_layers_traces_once_and_gives_the_same_numbers():
    layers = _stack()
    x = np.random.default_rng(1).standard_normal((3, 4)).astype("float32")
    CountingDense.calls = 0
    shared = ops.convert_to_numpy(_run(layers, shared=True)(x))
    shared_calls = CountingDense.calls
    CountingDense.calls = 0
    plain = ops.convert_to_numpy(_run(layers, shared=False)(x))
    plain_calls = CountingDense.calls
    # Inside a tensorflow trace the first layer is traced for all four;
    # elsewhere each layer runs (jax traces them all; torch runs eagerly).
    assert shared_calls == (1 if TENSORFLOW else 4)
    assert plain_calls == 4
    np.testing.assert_array_equal(shared, plain)


def test_layers_of_another_structure_get_their_own_trace():
    # Same variable shapes throughout, but layer 2 has another activation (a
    # config) and layer 3 a LoRA adapter (more variables): three structures.
    layers = _stack(activations=("gelu", "gelu", "relu", "gelu"), lora=(3,))
    x = np.random.default_rng(1).standard_normal((3, 4)).astype("float32")
    CountingDense.calls = 0
    shared = ops.convert_to_numpy(_run(layers, shared=True)(x))
    assert CountingDense.calls == (3 if TENSORFLOW else 4)
    np.testing.assert_array_equal(
        shared, ops.convert_to_numpy(_run(layers, shared=False)(x))
    )


@pytest.mark.skipif(not TENSORFLOW, reason="shared traces exist on tensorflow only")
def test_a_layer_alone_of_its_structure_is_called_plainly_given_the_stack():
    import tensorflow as tf

    layers = _stack(activations=("gelu", "gelu", "relu", "gelu"))
    x = np.random.default_rng(6).standard_normal((3, 4)).astype("float32")

    def run(stack):
        @tf.function(autograph=False)
        def fn(x):
            call = layer_caller(layers=stack)
            for layer in layers:
                x = call(layer, x)
            return x

        graph = fn.get_concrete_function(tf.TensorSpec((3, 4), "float32")).graph
        nested = [
            op
            for op in graph.get_operations()
            if op.type in ("PartitionedCall", "StatefulPartitionedCall")
        ]
        return len(nested), fn(x).numpy()

    everyone, out_all = run(None)
    shared_only, out_shared = run(layers)
    assert (everyone, shared_only) == (4, 3)  # the relu layer runs inline
    np.testing.assert_array_equal(out_shared, out_all)


@pytest.mark.skipif(not TENSORFLOW, reason="shared traces exist on tensorflow only")
def test_gradients_reach_every_layers_own_weights():
    import tensorflow as tf

    layers = _stack(lora=())
    x = tf.constant(np.random.default_rng(2).standard_normal((3, 4)), "float32")
    variables = [v.value for layer in layers for v in layer.trainable_variables]

    def loss(shared):
        @tf.function(autograph=False)
        def fn(x):
            with tf.GradientTape() as tape:
                call = layer_caller() if shared else (lambda layer, x: layer(x))
                y = x
                for layer in layers:
                    y = call(layer, y)
                total = tf.reduce_sum(y * y)
            return tape.gradient(total, variables)

        return [g.numpy() for g in fn(x)]

    for shared, plain in zip(loss(True), loss(False)):
        np.testing.assert_allclose(shared, plain, rtol=1e-5, atol=1e-6)


def test_an_mmdit_compiled_with_shared_block_traces_matches_its_eager_call():
    mmdit = MMDiT(
        hidden_dim=32,
        num_layers=4,
        num_heads=2,
        position_size=8,
        latent_channels=4,
        context_dim=16,
        pooled_dim=8,
        qk_norm="rms_norm",
        dual_attention_layers=(1,),
    )
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 8, 8, 4)).astype("float32")
    context = rng.standard_normal((2, 5, 16)).astype("float32")
    pooled = rng.standard_normal((2, 8)).astype("float32")
    timestep = np.array([0.5, 0.25], "float32")
    mmdit(latents, context, pooled, timestep)  # builds it
    for v in mmdit.variables:  # AdaLN-Zero starts at zero: make it count
        v.assign(rng.standard_normal(tuple(v.shape)).astype("float32") * 0.1)
    eager = ops.convert_to_numpy(mmdit(latents, context, pooled, timestep))
    compiled = compile_function(mmdit, mmdit.variables)
    out = ops.convert_to_numpy(compiled(latents, context, pooled, timestep))
    np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-5)


def test_a_function_traced_once_serves_every_call_of_its_shapes():
    calls = []

    def scaled(x, y, scale):
        calls.append(scale)
        return (x - y) * scale

    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal((3, 8)).astype("float32") for _ in range(2))
    c = rng.standard_normal((5, 8)).astype("float32")

    def fn(a, b, c):
        return [
            shared_traces.traced_once(scaled, (a, b), (2.0,)),
            shared_traces.traced_once(scaled, (b, a), (2.0,)),  # same trace
            shared_traces.traced_once(scaled, (a, b), (0.5,)),  # another static
            shared_traces.traced_once(scaled, (c, c), (2.0,)),  # another shape
        ]

    outs = [ops.convert_to_numpy(o) for o in compile_function(fn, [])(a, b, c)]
    expected = [(a - b) * 2.0, (b - a) * 2.0, (a - b) * 0.5, np.zeros((5, 8))]
    for out, value in zip(outs, expected):
        np.testing.assert_array_equal(out, value.astype("float32"))
    # Each (static, shapes) traces once on tensorflow, for the whole process.
    assert calls == ([2.0, 0.5, 2.0] if TENSORFLOW else [2.0, 2.0, 0.5, 2.0])
    compile_function(fn, [])(a, b, c)
    assert len(calls) == (3 if TENSORFLOW else 8)


@pytest.mark.skipif(not TENSORFLOW, reason="shared traces exist on tensorflow only")
def test_gradients_flow_through_a_function_traced_once():
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(5).standard_normal((2, 4)), "float32")

    def square_sum(x, shared):
        if shared:
            return shared_traces.traced_once(lambda t: t * t, (x,))
        return x * x

    grads = []
    for shared in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(
                tf.function(
                    functools.partial(square_sum, shared=shared), autograph=False
                )(x)
            )
        grads.append(tape.gradient(total, x).numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)
    np.testing.assert_allclose(grads[0], 2 * x.numpy(), rtol=1e-6)


def test_docstring_examples_run():
    result = doctest.testmod(shared_traces)
    assert result.attempted and not result.failed
