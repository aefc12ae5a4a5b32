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

Distribution (jax only) follows `keras.distribution`: variables carry the
layouts Keras gives them (`loading_weights` and `lay_out_variables` make sure
they have them), `distribute_batch` splits an input's batch axis over the
mesh's batch axis, and `jax.jit` compiles for the shardings it is given.
"""

import contextlib
import warnings

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
            model = factory()
        # Under a keras.distribution, give each new variable its layout now,
        # so the values assigned next are placed (sharded) as it says.
        if _jax_distribution() is not None:
            pending = global_state.get_global_attribute(key) or []
            for variable in pending:
                if not any(variable is b for b in before):
                    variable._initialize_layout()
        return model

    try:
        yield build
    except BaseException:
        # The half-loaded model is discarded: do not pay for initializing it.
        global_state.set_global_attribute(key, before)
        raise
    pending = global_state.get_global_attribute(key) or []
    global_state.set_global_attribute(key, before)
    for variable in pending:
        if variable._value is None and not any(variable is b for b in before):
            variable._deferred_initialize()


# ------------------------------------------------------------- distribution
def active_distribution():
    """The `keras.distribution` in effect, where keras_diffusion honours it.

    On jax, the distribution set with `keras.distribution.set_distribution`
    (or a `distribution.scope()`), or None. Other backends run on one device:
    with a distribution set, they warn that it is ignored and return None.

    Examples:

    >>> active_distribution() is None  # none set
    True
    """
    distribution = keras.distribution.distribution()
    if distribution is None or backend_name() == "jax":
        return distribution
    warnings.warn(
        f"keras_diffusion distributes only on the jax backend; the "
        f"{type(distribution).__name__} set with keras.distribution is ignored "
        f"on {backend_name()}, which runs on one device.",
        stacklevel=3,
    )
    return None


def _jax_distribution():
    """`active_distribution()` without the warning."""
    return keras.distribution.distribution() if backend_name() == "jax" else None


def data_parallel_size():
    """How many ways the batch axis is split (1 without a distribution).

    Examples:

    >>> data_parallel_size()
    1
    """
    distribution = _jax_distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)])


def distribute_batch(value):
    """Place `value` with its leading (batch) axis split over the devices.

    Uses the active distribution's `get_data_layout`; without one (or off
    jax) returns `value` unchanged. The batch must be a multiple of
    `data_parallel_size()`.

    Examples:

    >>> import numpy as np
    >>> tuple(distribute_batch(np.zeros((4, 2), "float32")).shape)
    (4, 2)
    """
    distribution = _jax_distribution()
    if distribution is None:
        return value
    value = keras.ops.convert_to_tensor(value)
    layout = distribution.get_data_layout(value.shape)
    return keras.distribution.distribute_tensor(value, layout)


def lay_out_variables(variables):
    """Place variables created before the distribution was set.

    Keras lays a variable out when it is created under a distribution; one
    created earlier has no layout. Under a distribution, such variables get
    the distribution's layout for them (replicated, or split as a
    `ModelParallel` layout map says) and their values are moved accordingly.

    Examples:

    >>> layer = keras.layers.Dense(2)
    >>> layer.build((None, 3))
    >>> lay_out_variables(layer.variables)  # no distribution: nothing to do
    """
    if _jax_distribution() is None:
        return
    for variable in variables:
        if getattr(variable, "_layout", None) is None and variable._value is not None:
            variable._initialize_layout()
            variable._direct_assign(variable._value)
