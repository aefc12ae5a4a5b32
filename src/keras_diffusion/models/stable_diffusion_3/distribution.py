"""Model-parallel layouts of `StableDiffusion3Backbone`, and their memory cost.

`layout_map(device_mesh)` builds the `keras.distribution.LayoutMap` that
`StableDiffusion3Backbone.get_layout_map` returns: Megatron-style splits of
the large weights over the mesh's model axis. A projection that widens the
stream (the fused q/k/v, the first MLP dense, the AdaLN modulation) is split
along its output columns, together with its bias; one that narrows it back
(the attention output, the second MLP dense) is split along its input rows,
its bias left whole. Covered are the MMDiT's image and text streams (every
block, the MMDiT-X second attention included) and the CLIP-L, CLIP-G and T5
encoder layers; the token tables and the MMDiT's position table are split
along their width. Everything else (norms, the VAE, the MMDiT's input and
output layers, CLIP's position tables) is replicated: 1 to 2 percent of the
released models' weights.

Every split dimension must be divisible by the size of the model axis; for
the released SD3 / SD3.5 configurations and the demo's that holds for every
power of two up to 32 (not for 3 or 6). `parameter_bytes_per_device` names
the first variable that does not split.

`parameter_bytes_per_device(config, mesh_shape)` answers "does it fit": it
builds the backbone of `config` without any values (every variable keeps its
path, shape and dtype, and no memory is allocated), applies the layout map
and adds up each device's share of every variable.

Examples:

>>> import keras
>>> mesh = keras.distribution.DeviceMesh(
...     (1, 8), ("batch", "model"), devices=[f"cpu:{i}" for i in range(8)]
... )
>>> layouts = layout_map(mesh)
>>> layouts["mmdit/block_3/x_qkv/kernel"].axes
(None, 'model')
>>> layouts["t5/encoder_layer_0/ffn_output/kernel"].axes
('model', None)
>>> layouts["vae/decoder/conv_in/kernel"] is None
True
"""

import contextlib
import functools
import json
import math
import re

import keras

MODEL_AXIS = "model"
BATCH_AXIS = "batch"

_ANY_PREFIX = r"(?:.*/)?"
_MMDIT_BLOCK = _ANY_PREFIX + r"mmdit/block_\d+/(?:x|context)_"
_CLIP_LAYER = _ANY_PREFIX + r"clip_[lg]/encoder_layer_\d+/"
_T5_LAYER = _ANY_PREFIX + r"t5/encoder_layer_\d+/"

_M = MODEL_AXIS  # replaced by `layout_map`'s `model_axis`
_WIDEN = r"(?:qkv(?:_2)?|modulation|mlp/dense_1)"
_NARROW = r"(?:attention_output(?:_2)?|mlp/dense_2)"

# (variable path regex, axes). Kernels that widen the stream are split along
# their outputs (their biases too), kernels that narrow it back along their
# inputs (biases whole); tables along their width.
LAYOUT_RULES = (
    # MMDiT joint blocks, image and text streams.
    (_MMDIT_BLOCK + _WIDEN + "/kernel", (None, _M)),
    (_MMDIT_BLOCK + _WIDEN + "/bias", (_M,)),
    (_MMDIT_BLOCK + _NARROW + "/kernel", (_M, None)),
    (_ANY_PREFIX + "mmdit/position_embedding", (None, None, _M)),
    # CLIP-L and CLIP-G.
    (_CLIP_LAYER + "(?:qkv|fc1)/kernel", (None, _M)),
    (_CLIP_LAYER + "(?:qkv|fc1)/bias", (_M,)),
    (_CLIP_LAYER + "(?:attention_output|fc2)/kernel", (_M, None)),
    (_ANY_PREFIX + "clip_[lg]/token_embedding/embeddings", (None, _M)),
    # T5 (no biases).
    (_T5_LAYER + "(?:qkv|ffn_gate_up)/kernel", (None, _M)),
    (_T5_LAYER + "(?:attention_output|ffn_output)/kernel", (_M, None)),
    (_ANY_PREFIX + "t5/token_embedding/embeddings", (None, _M)),
)


def layout_map(device_mesh, model_axis=MODEL_AXIS):
    """The `LayoutMap` that shards an SD3 backbone's large kernels.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `model_axis` (and usually one named "batch" for the data).
        model_axis: str. The mesh axis the kernels are split over.

    Returns:
        A `keras.distribution.LayoutMap` keyed by variable-path regexes
        (matched in full, any prefix allowed); unmatched variables are
        replicated.

    Examples:

    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 2), ("batch", "model"), devices=[f"cpu:{i}" for i in range(4)]
    ... )
    >>> layouts = layout_map(mesh)
    >>> layouts["clip_g/encoder_layer_5/qkv/bias"].axes
    ('model',)
    >>> layouts["mmdit/block_0/context_mlp/dense_2/kernel"].axes
    ('model', None)
    >>> layouts["mmdit/block_0/context_mlp/dense_2/bias"] is None
    True
    """
    if model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"The device mesh has axes {tuple(device_mesh.axis_names)}; it needs "
            f"one named {model_axis!r} to shard the model over."
        )
    layouts = keras.distribution.LayoutMap(device_mesh)
    for pattern, axes in LAYOUT_RULES:
        layouts[pattern] = tuple(model_axis if a == _M else a for a in axes)
    return layouts


@contextlib.contextmanager
def _without_values():
    """Create Keras variables with path, shape and dtype but no value."""
    from keras.src.backend.common import global_state

    key = "uninitialized_variables"
    before = list(global_state.get_global_attribute(key) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        # Forget the value-less variables, so nothing initializes them later.
        global_state.set_global_attribute(key, before)


def _fake_mesh(mesh_shape, axis_names):
    devices = [f"cpu:{i}" for i in range(math.prod(mesh_shape))]
    return keras.distribution.DeviceMesh(tuple(mesh_shape), axis_names, devices)


def parameter_bytes_per_device(
    config, mesh_shape=(1, 8), axis_names=(BATCH_AXIS, MODEL_AXIS), dtype="bfloat16"
):
    """Bytes of backbone weights each device holds under `layout_map`.

    The backbone of `config` is built without values (nothing is allocated),
    with the dtype policy `dtype`: the float32 islands (norms, the MMDiT's
    timestep and pooled embeddings, T5's output projection) stay 4 bytes a
    weight. Each variable split by the layout map costs a device
    `bytes / size of the model axis`; the rest costs every device its full
    size. A mesh without a model axis (pure data parallelism) replicates all.

    Args:
        config: a `StableDiffusion3Backbone` config dict (`clip_l`, `clip_g`,
            `mmdit`, `vae`, optionally `t5`, ...).
        mesh_shape: tuple of ints, the device mesh, e.g. `(1, 8)` or `(2, 4)`.
        axis_names: the mesh's axis names; "model" is the sharded one.
        dtype: the backbone's dtype policy name.

    Returns:
        A dict: for each component (`"clip_l"`, `"clip_g"`, `"t5"`,
        `"mmdit"`, `"vae"`) the bytes on one device, `"total"` their sum,
        `"unsharded"` the bytes of the whole model, `"parameters"` its
        number of weights, and `"sharded_fraction"` the share of the
        model's bytes that the layout map splits.

    Examples:

    >>> import json, os
    >>> from keras_diffusion.presets.catalogue import BUILTIN_DIR
    >>> with open(os.path.join(BUILTIN_DIR, "sd3_tiny_demo", "config.json")) as f:
    ...     config = json.load(f)["config"]
    >>> one = parameter_bytes_per_device(config, (1, 1), dtype="float32")
    >>> one["total"] == one["unsharded"] == 4 * 1614195
    True
    >>> eight = parameter_bytes_per_device(config, (1, 8), dtype="float32")
    >>> eight["total"] < one["total"]
    True
    """
    mesh = _fake_mesh(mesh_shape, tuple(axis_names))
    layouts = layout_map(mesh) if MODEL_AXIS in axis_names else None
    sizes = dict(zip(axis_names, mesh_shape))
    result = {"total": 0, "unsharded": 0, "parameters": 0}
    sharded = 0
    for path, shape, itemsize in _variable_specs(json.dumps(config), dtype):
        size = math.prod(shape) * itemsize
        layout = None if layouts is None else layouts[path]
        split = 1
        for dim, axis in zip(shape, layout.axes if layout else ()):
            if axis is not None:
                if dim % sizes[axis]:
                    raise ValueError(
                        f"{path} {shape} cannot be split over the {axis!r} "
                        f"axis of size {sizes[axis]}."
                    )
                split *= sizes[axis]
        component = path.split("/")[0]
        result[component] = result.get(component, 0) + size // split
        result["total"] += size // split
        result["unsharded"] += size
        result["parameters"] += math.prod(shape)
        sharded += size if split > 1 else 0
    result["sharded_fraction"] = sharded / result["unsharded"]
    return result


@functools.lru_cache(maxsize=16)
def _variable_specs(config_json, dtype):
    """(path, shape, bytes per item) of each variable of a value-less backbone."""
    from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (  # noqa: E501
        StableDiffusion3Backbone,
    )

    config = json.loads(config_json)
    arguments = {
        k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")
    }
    with _without_values():
        backbone = StableDiffusion3Backbone(**arguments, dtype=dtype)
    return tuple((v.path, tuple(v.shape), _itemsize(v)) for v in backbone.variables)


def _itemsize(variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return int(re.search(r"\d+", dtype).group()) // 8
