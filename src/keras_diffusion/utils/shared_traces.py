"""One traced graph for a model's repeated layers, on tensorflow.

A tensorflow trace builds every graph op in Python: each MMDiT block of
`bench` traces as about 290 ops (~0.08 s), and SD3-medium has 24 blocks,
CLIP-G 32 layers, T5 24. `layer_caller()` gives a `call(layer, *args,
**options)` for such a stack: inside a trace, the first layer of each
structure is traced once as a nested `tf.function` that takes the weights
as arguments (a `keras.StatelessScope` maps that layer's variables to them),
and every layer of the same structure calls it with its own weights. The
nested graph is inlined when tensorflow instantiates the outer one: the
denoising loop of `bench` traces in 0.28-0.33 s instead of 0.48-0.52, and
its images came out bit-identical (`bench` and `wide`, float32 and
bfloat16). The VAE's resnets do not use it: their outputs moved by
rounding, and their traces got no faster.

`traced_once(fn, tensors, static)` does the same for a function of tensors
alone, such as a group norm: one nested trace per function, static
arguments and input shapes and dtypes, kept for the process (at most
`TRACED_ONCE_LIMIT`, the least recently used dropped first) and shared by
every trace that calls it. The 36 group norms of the `bench` and `wide`
VAEs at 512x512 need 6 traces, and the image encoder and decoder trace in
about 60% of the time (docs/performance.md), their images bit-identical.

Elsewhere (jax traces through `jax.jit` anyway; torch runs eagerly; and
on tensorflow outside a trace, or with symbolic Keras inputs) `call` calls
the layer plainly, and `traced_once` calls `fn`.
"""

import collections
import threading

import keras

from keras_diffusion.utils.backend import backend_name


def layer_caller(plain_call=None, layers=None):
    """A `call(layer, *args, **options)` for one pass over a stack of layers.

    `plain_call(layer, *args, **options)` is how a layer is called where no
    trace is shared (default: the layer's `__call__`; MMDiT passes
    `fast_ops.call_layer`).

    Layers share a trace when they have the same structure: the same class
    and configuration (name aside) for themselves and every sublayer, and
    variables of the same shapes and dtypes in the same order; `options`
    (Python values, such as MMDiT's `last_token_repeats`) must match too.
    The traces live as long as the caller, one pass of one model call.
    Given the whole stack as `layers`, a layer whose structure occurs once
    in it is called plainly: a nested trace only pays where it is shared
    (calling one costs more than tracing the layer inline; `wide`'s two
    MMDiT blocks differ).

    Examples:

    >>> import numpy as np
    >>> layers = [keras.layers.Dense(4, name=f"d{i}") for i in range(3)]
    >>> x = np.ones((2, 4), "float32")
    >>> call = layer_caller()
    >>> for layer in layers:
    ...     x = call(layer, x)
    >>> tuple(x.shape)
    (2, 4)
    """
    traces = {}
    structures = {}  # id(layer) -> its structure, worked out once
    repeated = None  # structures occurring more than once in `layers`

    def structure(layer):
        if id(layer) not in structures:
            structures[id(layer)] = _structure(layer)
        return structures[id(layer)]

    def call_plainly(layer, *args, **options):
        if plain_call is not None:
            return plain_call(layer, *args, **options)
        return layer(*args, **options)

    def call(layer, *args, **options):
        nonlocal repeated
        if not _in_tensorflow_trace(layer, args):
            return call_plainly(layer, *args, **options)
        if layers is not None:
            if repeated is None:  # the first call inside a trace counts them
                counts = collections.Counter(structure(lay) for lay in layers)
                repeated = {s for s, n in counts.items() if n > 1}
            if structure(layer) not in repeated:
                return call_plainly(layer, *args, **options)
        key = (structure(layer), repr(sorted(options.items())))
        if key not in traces:
            traces[key] = _traced_with_weights(layer, options)
        return traces[key]([v.value for v in layer.variables], *args)

    return call


def _in_tensorflow_trace(layer, args):
    if backend_name() != "tensorflow" or not layer.built:
        return False
    import tensorflow as tf

    return tf.inside_function() and all(tf.is_tensor(a) for a in args)


def _structure(layer):
    """What two layers must share to run as one trace (hashable)."""
    layers = [layer, *layer._flatten_layers(include_self=False)]
    configs = []
    for sublayer in layers:
        config = dict(sublayer.get_config())
        config.pop("name", None)
        configs.append((type(sublayer), repr(sorted(config.items()))))
    variables = tuple(
        (tuple(v.shape), keras.backend.standardize_dtype(v.dtype))
        for v in layer.variables
    )
    return tuple(configs), variables


def _traced_with_weights(template, options):
    """`template` as a `tf.function(weights, *args)`, for any layer of its
    structure: `weights` are that layer's variable values, in order."""
    import tensorflow as tf

    variables = list(template.variables)

    def run(weights, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
            return template(*args, **options)

    return tf.function(run, autograph=False, reduce_retracing=False)


TRACED_ONCE_LIMIT = 256
_traced_once = collections.OrderedDict()
_traced_once_lock = threading.Lock()


def traced_once(fn, tensors, static=()):
    """`fn(*tensors, *static)`, inside a tensorflow trace through a nested one.

    `fn` must compute its outputs from `tensors` (fully shaped) and the
    hashable `static` values alone: it may read no variable or other state,
    since its trace serves every later call with the same `fn`, `static`,
    shapes and dtypes, in any trace of the process.

    Examples:

    >>> import numpy as np
    >>> def scaled_sum(x, y, scale):
    ...     return (x + y) * scale
    >>> x = np.ones((2, 3), "float32")
    >>> out = traced_once(scaled_sum, (x, x), static=(0.5,))
    >>> float(keras.ops.sum(out))
    6.0
    """
    if backend_name() != "tensorflow":
        return fn(*tensors, *static)
    import tensorflow as tf

    tensors = [
        tf.convert_to_tensor(t) if isinstance(t, keras.Variable) else t for t in tensors
    ]
    if not (
        tf.inside_function()
        and all(tf.is_tensor(t) and t.shape.is_fully_defined() for t in tensors)
    ):
        return fn(*tensors, *static)
    key = (fn, static, tuple((tuple(t.shape), t.dtype) for t in tensors))
    with _traced_once_lock:
        traced = _traced_once.get(key)
        if traced is not None:
            _traced_once.move_to_end(key)
    if traced is None:
        traced = tf.function(
            lambda *args: fn(*args, *static), autograph=False
        ).get_concrete_function(*[tf.TensorSpec(t.shape, t.dtype) for t in tensors])
        with _traced_once_lock:
            _traced_once[key] = traced
            while len(_traced_once) > TRACED_ONCE_LIMIT:
                _traced_once.popitem(last=False)
    return traced(*tensors)
