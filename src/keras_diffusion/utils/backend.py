"""The one module that knows which Keras backend runs.

`compile_function(fn, variables)` returns a callable that runs `fn` compiled
for the current backend:

- jax: `jax.jit` of a stateless function; the variables' current values are
  passed in as arguments on every call (explicit state: weights changed by
  `fit` are seen, nothing is baked into the compiled program);
- tensorflow: `tf.function` without autograph, which reads the variables
  on every call, and without shape relaxation: each new input shape gets
  its own trace, as in a fresh task, so a repeated call is bit-identical
  to a fresh task's (a relaxed trace, with unknown batch and size axes,
  picks other kernels: on an AVX2 EPYC it differed from a fresh task by
  one uint8 level in one pixel); each call carries lighter grappler
  options on a CPU-only tensorflow (`_tf_rewrite_options`);
- torch: eager under `torch.no_grad()`.

Everything `fn` receives must be an argument; it must not read per-call
Python attributes, so one compiled function serves every later call.

On jax and tensorflow, a call with arguments of a new shape or dtype traces
and compiles, and the compiler frees its working memory to the C heap, where
glibc keeps it; that call then hands it back to the system
(`release_freed_memory`), so the next phases do not peak on top of it.

The fastest CPU paths of the hot operations (attention, dense, convolution,
group norm) differ by backend too; they live in `utils.fast_ops`,
`utils.fast_elementwise`, `utils.fast_attention` and `utils.fast_conv`.

The helpers that build models for loading and assign weights with few copies
live in `utils.weight_loading`.

Distribution (jax only) follows `keras.distribution`: variables carry the
layouts Keras gives them (`weight_loading.loading_weights` and
`lay_out_variables` make sure they have them), `distribute_batch` splits an
input's batch axis over the mesh's batch axis, and `jax.jit` compiles for the
shardings it is given.
"""

import copy
import functools
import sys
import warnings

import keras


def backend_name():
    return keras.backend.backend()


def compile_function(
    fn, variables, jit_compile=False, rewrite_passes=1, trace_on_tensorflow=True
):
    """`fn` compiled for the current backend (see the module docstring).

    `rewrite_passes` (tensorflow only) is how many rounds of grappler's graph
    rewrites a CPU-only tensorflow runs when it first instantiates a trace
    (`_tf_rewrite_options`): one is enough for the encoders and the decoder,
    whose second round changes no node; the MMDiT needs two (its second
    remapper round fuses about 100 more nodes).

    `trace_on_tensorflow=False` runs `fn` eagerly on tensorflow: for work
    done once per call on a few hundred tokens (the text encoders), whose
    first call's tracing and graph rewrites (0.3-0.45 s on the benchmark
    models) cost more than a graph saves on the later calls (0.03 s on the
    same models, about 40 microseconds an op at any size).
    """
    if rewrite_passes not in (1, 2):
        raise ValueError(f"`rewrite_passes` must be 1 or 2; got {rewrite_passes!r}.")
    backend = backend_name()
    if backend == "tensorflow" and not trace_on_tensorflow:
        return fn
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

        return _releasing_after_compiles(call)
    if backend == "tensorflow":
        import tensorflow as tf

        # No autograph: the loops are explicit (`sequential_fori_loop`), and
        # converting the Python source costs ~30% of a first call's tracing.
        # No shape relaxation: see the module docstring.
        traced = tf.function(
            fn, jit_compile=jit_compile, reduce_retracing=False, autograph=False
        )
        return _releasing_after_compiles(
            _with_rewrite_options(traced, rewrite_passes), traced
        )
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


def _with_rewrite_options(traced, rewrite_passes):
    """`traced` (a `tf.function`), called with `_tf_rewrite_options`.

    The options travel with each call (the thread's function-call options,
    restored after it), so they reach only our compiled functions: other
    tensorflow code in the process keeps its settings.
    """
    try:
        from tensorflow.python.eager import context
    except ImportError:  # a tensorflow without this (private) module
        return traced

    def call(*args):
        ctx = context.context()
        before = ctx.function_call_options
        options = _tf_rewrite_options(before, rewrite_passes)
        if options is None:
            return traced(*args)
        ctx.function_call_options = options
        try:
            return traced(*args)
        finally:
            ctx.function_call_options = before

    return call


def _tf_rewrite_options(current, rewrite_passes):
    """`current` function-call options with lighter graph rewrites, or None.

    A first call's instantiation of each trace runs grappler: 0.62-0.68 s of
    the 2.3 s a first `generate` on `bench` spent on top of a warm one
    (`benchmarks/first_call.py --grappler`). On a CPU-only tensorflow, three of
    its optimizers change no node of our graphs yet cost 0.28 s of that (the
    layout optimizer converts layouts for GPUs, the memory optimizer swaps
    and recomputes for training, the TFG passes infer shapes the graphs
    already have), and the second round, which changes nothing outside the
    MMDiT, 0.12 s more (ad hoc). Without them grappler takes 0.32-0.38 s, and every
    output is bit-identical (bench and wide, float32 and bfloat16). With a
    GPU visible, the defaults stay (the layout optimizer serves cuDNN there).
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

    if tf.config.list_logical_devices("GPU"):
        return None
    config = config_pb2.ConfigProto()
    config.ParseFromString(current.config_proto_serialized)
    rewrites = config.graph_options.rewrite_options
    enums = rewriter_config_pb2.RewriterConfig
    rewrites.layout_optimizer = enums.OFF
    rewrites.memory_optimization = enums.NO_MEM_OPT
    rewrites.disable_tfg_optimizer = True
    rewrites.meta_optimizer_iterations = enums.ONE if rewrite_passes == 1 else enums.TWO
    options = copy.copy(current)
    options.config_proto_serialized = config
    return options


def sequential_fori_loop(lower, upper, body, init):
    """`ops.fori_loop` whose iterations run one after another.

    tensorflow's `while_loop` starts up to 10 iterations at once wherever
    their ops do not wait on the loop state. In the denoising loop, the next
    steps' work that depends only on the step index (the timestep embedding,
    every block's modulation) can then run, and hold its buffers, while the
    current step's matmuls run. A bfloat16 6-step loop on `bench` held 139 to
    322 MiB of tensorflow's pool that way (2 of 8 runs above 300), against
    116 to 125 MiB one step at a time, which is no slower and bit-identical
    (docs/performance.md). jax and torch run the loop in order anyway.
    """
    if backend_name() == "tensorflow":
        import tensorflow as tf

        return tf.while_loop(
            lambda i, value: i < upper,
            lambda i, value: (i + 1, body(i, value)),
            (lower, init),
            parallel_iterations=1,
        )[1]
    return keras.ops.fori_loop(lower, upper, body, init)


def _releasing_after_compiles(compiled, wrapped=None):
    """`compiled`, returning freed heap memory after each call that compiled.

    A call whose arguments have a shape or dtype not seen before traces and
    compiles (each gets its own program: no shape relaxation). XLA's and
    grappler's working memory is freed by then, but glibc keeps it in its
    heaps, and the process's later phases then peak on top of it (`python
    benchmarks/rss_phases.py --backend jax --dtype bfloat16`:
    docs/performance.md). Warm calls pay one set lookup. `__wrapped__` is `wrapped`
    or `compiled` (on tensorflow the `tf.function`, for
    `get_concrete_function`).
    """
    seen = set()

    def call(*args):
        signature = tuple(
            (tuple(keras.ops.shape(x)), keras.backend.standardize_dtype(x.dtype))
            if hasattr(x, "dtype")
            else (type(x), x)
            for x in keras.tree.flatten(args)
        )
        out = compiled(*args)
        if signature not in seen:
            seen.add(signature)
            release_freed_memory()
        return out

    call.__wrapped__ = compiled if wrapped is None else wrapped
    return call


def release_freed_memory():
    """Return the C heap's free memory to the system (glibc; else nothing).

    glibc's malloc keeps freed blocks under its (adaptive) mmap threshold,
    up to 32 MB each, in its heaps for reuse: after loading a large model
    tensor by tensor, or building one whose random initial values are
    overwritten, that is hundreds of MB the process no longer uses but
    still holds. `malloc_trim(0)` gives the whole free pages back. Returns
    whether it ran.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only (not musl)
    except (AttributeError, OSError):
        return None


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
