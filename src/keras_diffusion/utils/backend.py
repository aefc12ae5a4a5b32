"""The one module that knows which Keras backend runs.

`compile_function(fn, variables)` returns a callable that runs `fn` compiled
for the current backend:

- jax: `jax.jit` of a stateless function; the variables' current values are
  passed in as arguments on every call (explicit state: weights changed by
  `fit` are seen, nothing is baked into the compiled program);
- tensorflow: `tf.function`, which reads the variables on every call;
- torch: eager under `torch.no_grad()`.

Everything `fn` receives must be an argument; it must not read per-call
Python attributes, so one compiled function serves every later call.
"""

import contextlib

import keras


def backend_name():
    return keras.backend.backend()


def compile_function(fn, variables, jit_compile=False):
    backend = backend_name()
    if backend == "jax":
        import jax

        variables = list(variables)

        def stateless(values, *args):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                return fn(*args)

        jitted = jax.jit(stateless)

        def call(*args):
            return jitted([v.value for v in variables], *args)

        return call
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
    if backend == "torch":
        import torch

        def call(*args):
            with torch.no_grad():
                return fn(*args)

        return call
    raise ValueError(
        f"Unsupported Keras backend {backend!r}; keras_diffusion runs on jax, "
        "tensorflow and torch."
    )



@contextlib.contextmanager
def loading_weights():
    """Build models whose every weight is about to be overwritten.

    Yields `build(factory)`, which calls `factory()` and returns the model.
    On jax, running the random initializers compiles one XLA program per
    weight shape (seconds for an SD3 backbone, for values thrown away at
    once), so there the model is built with Keras' deferred initialization:
    its variables exist but hold nothing until the caller assigns them,
    inside the `with` block. On leaving the block, any variable still
    unassigned gets its initializer after all, so no model is left
    half-built. Other backends initialize eagerly and cheaply; there
    `build` just calls `factory`.

        with loading_weights() as build:
            backbone = build(lambda: cls(**config))
            backbone.load_weights(path)
    """
    if backend_name() != "jax":
        yield lambda factory: factory()
        return
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key) or [])

    def build(factory):
        with keras.StatelessScope(initialize_variables=False):
            return factory()

    try:
        yield build
    finally:
        pending = global_state.get_global_attribute(key) or []
        global_state.set_global_attribute(key, before)
        for variable in pending:
            if variable._value is None and not any(variable is b for b in before):
                variable._deferred_initialize()
