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
group norm) differ by backend too; they live in `utils.fast_ops`.

Distribution (jax only) follows `keras.distribution`: variables carry the
layouts Keras gives them (`loading_weights` and `lay_out_variables` make sure
they have them), `distribute_batch` splits an input's batch axis over the
mesh's batch axis, and `jax.jit` compiles for the shardings it is given.
"""

import contextlib
import copy
import functools
import sys
import warnings

import keras
import numpy as np


def backend_name():
    return keras.backend.backend()


def compile_function(fn, variables, jit_compile=False, rewrite_passes=1):
    """`fn` compiled for the current backend (see the module docstring).

    `rewrite_passes` (tensorflow only) is how many rounds of grappler's graph
    rewrites a CPU-only tensorflow runs when it first instantiates a trace
    (`_tf_rewrite_options`): one is enough for the encoders and the decoder,
    whose second round changes no node; the MMDiT needs two (its second
    remapper round fuses about 100 more nodes).
    """
    if rewrite_passes not in (1, 2):
        raise ValueError(f"`rewrite_passes` must be 1 or 2; got {rewrite_passes!r}.")
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
    (README, "Performance"). jax and torch run the loop in order anyway.
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
    benchmarks/rss_phases.py --backend jax --dtype bfloat16`: README,
    "Performance"). Warm calls pay one set lookup. `__wrapped__` is `wrapped`
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


@contextlib.contextmanager
def loading_weights():
    """Build models whose every weight is about to be overwritten.

    Yields `build(factory)`, which calls `factory()` and returns the model,
    built with Keras' deferred initialization: running the random
    initializers costs seconds for an SD3 backbone (on jax, one compiled XLA
    program per weight shape), for values thrown away at once.

    - jax: the variables exist but hold nothing until the caller assigns
      them, inside the `with` block; on leaving it, any variable still
      unassigned gets its initializer after all, so no model is left
      half-built.
    - tensorflow, torch: Keras assigns only to a variable that holds a
      value, so each one with a random initializer gets allocated memory
      that nothing writes (`_unfilled`: no random numbers, no fill, no page
      touched before the load's own write); others (constants, seed states)
      get their own initializer. The loaders check that they assign every
      variable (Keras' `load_weights` per layer, our converters per model),
      so none keeps its unwritten value.

    Leaving the block (and, off jax, each `build`) hands the temporaries'
    freed memory back to the system (`release_freed_memory`).

        with loading_weights() as build:
            backbone = build(lambda: cls(**config))
            backbone.load_weights(path)
    """
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    # Always a copy: Keras appends each new deferred variable to the list
    # it holds, which must never be `before` itself.
    before = list(global_state.get_global_attribute(key) or [])

    def new_variables():
        pending = global_state.get_global_attribute(key) or []
        return [v for v in pending if not any(v is b for b in before)]

    converting = []

    def build(factory):
        with keras.StatelessScope(initialize_variables=False):
            model = factory()
        if backend_name() != "jax":
            for variable in new_variables():
                random = isinstance(variable._initializer, RANDOM_INITIALIZERS)
                variable._initialize_with_initializer(
                    _unfilled if random else variable._initializer
                )
                variable._initializer = None
            global_state.set_global_attribute(key, list(before))
            release_freed_memory()
        else:
            for variable in new_variables():
                if _jax_distribution() is not None:
                    # Under a keras.distribution, give each new variable its
                    # layout now, so the values assigned next are placed
                    # (sharded) as it says.
                    variable._initialize_layout()
                # (A second `build` sees the first one's variables again.)
                if "_convert_to_tensor" not in vars(variable):
                    variable._convert_to_tensor = _jax_host_convert
                    converting.append(variable)
        return model

    try:
        yield build
    except BaseException:
        # The half-loaded model is discarded: do not pay for initializing it.
        global_state.set_global_attribute(key, list(before))
        raise
    finally:
        for variable in converting:
            del variable._convert_to_tensor  # back to the class's method
        release_freed_memory()
    pending = new_variables()
    global_state.set_global_attribute(key, list(before))
    for variable in pending:
        if variable._value is None:
            variable._deferred_initialize()


def _jax_host_convert(value, dtype=None):
    """A jax variable's `_convert_to_tensor` while `loading_weights` loads it.

    Keras' jax `convert_to_tensor` makes a value read from a file a JAX
    array, then casts it on the device: small XLA programs compiled for each
    weight shape (89 for the `bench` backbone loaded in bfloat16: a quarter
    of the load's resident memory and about two seconds). numpy casts on the
    host, and `jax.device_put` copies without compiling.
    """
    import jax
    import ml_dtypes

    if dtype is None or isinstance(value, jax.Array) or keras.ops.is_tensor(value):
        return keras.ops.convert_to_tensor(value, dtype=dtype, sparse=False)
    dtype = keras.backend.standardize_dtype(dtype)
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    return jax.device_put(np.asarray(value).astype(target, copy=False))


def _unfilled(shape, dtype=None):
    """A tensor of `shape` whose memory is allocated but never written.

    `loading_weights`' stand-in for a random initial value off jax. A fill
    (zeros) would write every page once before the load writes it again,
    and keep the freed pages resident (README, "loading builds the model").
    """
    dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
    if backend_name() == "tensorflow":
        import tensorflow as tf

        return tf.raw_ops.Empty(shape=shape, dtype=tf.as_dtype(dtype), init=False)
    import torch
    from keras.src.backend.torch.core import get_device, to_torch_dtype

    return torch.empty(shape, dtype=to_torch_dtype(dtype), device=get_device())


# The initializers `loading_weights` skips off jax (their values would be
# overwritten at once).
RANDOM_INITIALIZERS = (
    keras.initializers.RandomNormal,
    keras.initializers.RandomUniform,
    keras.initializers.TruncatedNormal,
    keras.initializers.VarianceScaling,  # Glorot, He, LeCun
    keras.initializers.Orthogonal,
)


def assign_array(variable, array):
    """`variable.assign(array)` for a numpy `array` of its shape, copying less.

    Keras' `assign` first converts the whole array to a tensor: on torch a
    full copy (`np.array`), on tensorflow one more inside the assignment.
    On torch the array is copied straight into the variable's storage; on
    tensorflow a large array is assigned in slices of about `ASSIGN_SLICE`
    bytes along its first axis, so the temporary copies stay small (row
    scatters, as fast as one whole assignment; sliced `assign`s were four to
    six times slower), and the variable is then taken out of the copy-on-read
    mode that any partial write puts it in. Every
    `RELEASE_EVERY` bytes assigned, the memory the C heap keeps from the
    freed arrays is handed back to the system (`release_freed_memory`), so
    a conversion's peak stays near the model's own size.

    The variable never keeps a view of `array`: jax on CPU, and Keras' torch
    variables for dtypes torch's numpy bridge lacks (bfloat16), can adopt a
    numpy array's memory instead of copying it, so there an array that does
    not own its memory (a view of a memory-mapped file) is copied first.

    Examples:

    >>> import numpy as np
    >>> variable = keras.Variable(np.zeros((2, 3), "float32"))
    >>> assign_array(variable, np.ones((3, 2), "float32").T)
    >>> float(keras.ops.convert_to_numpy(variable).sum())
    6.0
    """
    global _assigned_bytes
    backend = backend_name()
    # isbuiltin is 2 for types numpy's C API does not know (ml_dtypes').
    builtin = array.dtype.isbuiltin == 1
    adopts = backend == "jax" or (backend == "torch" and not builtin)
    if adopts and not _owns_memory(array):
        array = array.copy()
    if backend == "torch" and builtin and array.size:
        import torch

        with torch.no_grad():
            variable.value.copy_(torch.from_numpy(array))
    elif (
        backend == "tensorflow"
        and array.ndim
        and array.nbytes > ASSIGN_SLICE
        and keras.backend.standardize_dtype(variable.dtype) == array.dtype.name
    ):
        import tensorflow as tf

        rows = max(1, ASSIGN_SLICE * len(array) // array.nbytes)
        for start in range(0, len(array), rows):
            stop = min(start + rows, len(array))
            variable.value.scatter_update(
                tf.IndexedSlices(array[start:stop], tf.range(start, stop))
            )
        # A partial write (scatter or sliced assign) switches the variable to
        # copy-on-read: every later read, each step's included, would copy it.
        tf.raw_ops.DisableCopyOnRead(resource=variable.value.handle)
    else:
        variable.assign(array)
    _assigned_bytes += array.nbytes
    if _assigned_bytes >= RELEASE_EVERY:
        release_freed_memory()


def _owns_memory(array):
    """Whether numpy allocated `array`'s memory (not a foreign buffer's)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return isinstance(array, np.ndarray)


# `assign_array`'s slice size on tensorflow, and how many bytes it assigns
# between two `release_freed_memory` calls (counted in `_assigned_bytes`).
ASSIGN_SLICE = 16 * 2**20
RELEASE_EVERY = 64 * 2**20
_assigned_bytes = 0


def release_freed_memory():
    """Return the C heap's free memory to the system (glibc; else nothing).

    glibc's malloc keeps freed blocks under its (adaptive) mmap threshold,
    up to 32 MB each, in its heaps for reuse: after loading a large model
    tensor by tensor, or building one whose random initial values are
    overwritten, that is hundreds of MB the process no longer uses but
    still holds. `malloc_trim(0)` gives the whole free pages back. Returns
    whether it ran.
    """
    global _assigned_bytes
    _assigned_bytes = 0
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
