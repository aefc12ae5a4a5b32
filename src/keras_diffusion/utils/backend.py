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
