"""Building models whose weights are about to be loaded, and loading them.

`loading_weights()` builds a model without running the random initializers
whose values a load overwrites at once; `assign_array(variable, array)`
writes a numpy array into a variable with as few copies as the backend
allows. Presets (`presets/weights_io.py`) and checkpoint conversion
(`converters/`) load through both. `adopt_array(variable, array)` makes a
variable use an array's memory itself, for a preset's memory-mapped file.
"""

import contextlib

import keras
import numpy as np

from keras_diffusion.utils.backend import (
    active_distribution,
    backend_name,
    release_freed_memory,
)


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
                if active_distribution() is not None:
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
    and keep the freed pages resident (docs/performance.md, "loading builds the model").
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
        _assigned_bytes = 0


def adopt_array(variable, array):
    """Make `variable` hold `array`'s memory itself, without a copy, if it can.

    For a preset's memory-mapped file (`presets/weights_io.py`): the variable
    then reads the file's cached pages, mapped copy-on-write, so loading
    writes nothing and faults in no fresh memory (the page faults of a copy
    were about half of tensorflow's load: docs/performance.md), and a write
    (`fit`) copies only the pages it touches. The mapping lives as long as
    any variable holds a view of it. This is the safetensors loaders'
    trade-off in torch: the file must not be truncated or rewritten in place
    while the model lives (our presets are replaced atomically, as a new
    file).

    Returns whether it adopted: on tensorflow (through DLPack) for an array
    aligned to 64 bytes, as tensorflow requires, and on torch on the CPU;
    never on jax (Keras' compiled jax train steps donate the variables'
    buffers to XLA, which must not be handed memory it does not own), nor
    for an array of another dtype or shape than the variable's, or not
    contiguous and writable.

    Examples:

    >>> import numpy as np
    >>> variable = keras.Variable(np.zeros((2, 3), "float32"))
    >>> array = np.arange(6, dtype="float32").reshape(2, 3)
    >>> if not adopt_array(variable, array):  # jax, or memory it cannot share
    ...     assign_array(variable, array)
    >>> keras.ops.convert_to_numpy(variable).tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    backend = backend_name()
    if (
        backend not in ("tensorflow", "torch")
        or not array.size
        or not (array.flags.c_contiguous and array.flags.aligned)
        or not array.flags.writeable
        or tuple(array.shape) != tuple(variable.shape)
        or array.dtype.name != keras.backend.standardize_dtype(variable.dtype)
    ):
        return False
    # ml_dtypes' types (bfloat16) travel as the unsigned integer of their size.
    raw = (
        array if array.dtype.isbuiltin == 1 else array.view(f"u{array.dtype.itemsize}")
    )
    if backend == "tensorflow":
        import tensorflow as tf

        if array.ctypes.data % 64:
            return False  # tensorflow aborts on unaligned foreign memory
        tensor = tf.experimental.dlpack.from_dlpack(raw.__dlpack__())
        if raw is not array:
            tensor = tf.bitcast(tensor, tf.as_dtype(array.dtype.name))
        variable.value.assign(tensor)
        return True
    import torch
    from keras.src.backend.torch.core import get_device, to_torch_dtype

    if str(get_device()) != "cpu":
        return False
    with torch.no_grad():
        variable.value.data = torch.from_numpy(raw).view(
            to_torch_dtype(array.dtype.name)
        )
    return True


def _owns_memory(array):
    """Whether numpy allocated `array`'s memory (not a foreign buffer's)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return isinstance(array, np.ndarray)


# `assign_array`'s slice size on tensorflow, and how many bytes it assigns
# before it calls `release_freed_memory` (counted in `_assigned_bytes`).
ASSIGN_SLICE = 16 * 2**20
RELEASE_EVERY = 64 * 2**20
_assigned_bytes = 0
