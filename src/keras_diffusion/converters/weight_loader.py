"""Bookkeeping shared by the weight converters.

A `WeightLoader` copies tensors from a `TensorSource` into the variables of
one Keras layer, checking every shape, and remembers which tensors it read
and which variables it set. `finish()` then fails on any checkpoint tensor
left unused (other than the `ignore`d buffers) and any layer variable left
unassigned. Helpers map torch `Linear` (several fused into one `Dense`),
`Conv2d` and norm parameters to their Keras layouts.

Examples:

>>> import keras
>>> import numpy as np
>>> from keras_diffusion.converters.safetensors_reader import TensorSource
>>> dense = keras.layers.Dense(6)
>>> dense.build((None, 4))
>>> source = TensorSource.from_dict({
...     "q.weight": np.ones((3, 4)), "q.bias": np.zeros(3),
...     "k.weight": np.ones((3, 4)), "k.bias": np.zeros(3),
... })
>>> loader = WeightLoader(source, dense)
>>> loader.linear(dense, "q", "k")
>>> loader.finish()
>>> tuple(dense.kernel.shape)
(4, 6)
>>> WeightLoader(source, dense).finish()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: 4 checkpoint tensor(s) were not used by Dense: ['k.bias', ...
"""

import numpy as np

from keras_diffusion.converters.safetensors_reader import assign


class WeightLoader:
    """Copies checkpoint tensors into `layer`'s variables, keeping account.

    Args:
        source: a `TensorSource` keyed by the checkpoint's tensor names.
        layer: the Keras layer (or model) being loaded; `finish()` checks
            that every one of its variables was assigned.
        ignore: names of checkpoint tensors that may be left unused (e.g.
            non-persistent buffers some checkpoints carry).

    Every method raises `KeyError` for a missing tensor and `ValueError` for
    a tensor of the wrong shape, naming the tensor.

    Examples:

    >>> import keras
    >>> import numpy as np
    >>> from keras_diffusion.converters.safetensors_reader import TensorSource
    >>> norm = keras.layers.LayerNormalization()
    >>> norm.build((None, 3))
    >>> source = TensorSource.from_dict({"ln.weight": np.ones(2)})
    >>> WeightLoader(source, norm).norm(norm, "ln")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Checkpoint tensor 'ln.weight' has shape (2,), but the model ...
    """

    def __init__(self, source, layer, ignore=()):
        self.source = source
        self.layer = layer
        self.ignore = set(ignore)
        self.used = set()
        self.assigned = set()

    def check(self, name, shape, variable=None):
        """Mark tensor `name` used, checking that it exists and has `shape`.

        Reads only the header, so a tied duplicate can be accounted for
        without loading it.
        """
        actual = tuple(self.source.shape(name))  # KeyError naming the tensor
        if actual != tuple(shape):
            target = "" if variable is None else f" for {variable.path!r}"
            raise ValueError(
                f"Checkpoint tensor {name!r} has shape {actual}, but the model "
                f"expects {tuple(shape)}{target}."
            )
        self.used.add(name)

    def get(self, name, shape, variable=None):
        """Return tensor `name` (a fresh array) after checking its shape."""
        self.check(name, shape, variable)
        return self.source.get(name)

    def assign(self, variable, array, name):
        """Assign `array` (checkpoint tensor `name`) to `variable`."""
        assign(variable, array, name)
        self.assigned.add(id(variable))

    def copy(self, variable, name):
        """Copy tensor `name`, which must have `variable`'s shape, into it."""
        self.assign(variable, self.get(name, variable.shape, variable), name)

    def linear(self, dense, *names, bias=True):
        """Torch `Linear`s `names` -> Keras `Dense`, outputs concatenated.

        Each `{name}.weight` is `(out, in)` with `out` an equal share of the
        Dense's units; the Keras kernel is their concatenation, transposed.
        """
        fan_in, units = dense.kernel.shape
        part = units // len(names)
        kernels = [self.get(f"{n}.weight", (part, fan_in), dense.kernel) for n in names]
        label = "+".join(f"{n}.weight" for n in names)
        self.assign(dense.kernel, np.concatenate(kernels, axis=0).T, label)
        if bias:
            biases = [self.get(f"{n}.bias", (part,), dense.bias) for n in names]
            label = "+".join(f"{n}.bias" for n in names)
            self.assign(dense.bias, np.concatenate(biases, axis=0), label)

    def conv(self, conv, prefix):
        """Torch `Conv2d` `prefix`: kernel `(out, in, kh, kw) -> (kh, kw, in, out)`."""
        kh, kw, fan_in, out = conv.kernel.shape
        name = f"{prefix}.weight"
        kernel = self.get(name, (out, fan_in, kh, kw), conv.kernel)
        self.assign(conv.kernel, np.transpose(kernel, (2, 3, 1, 0)), name)
        self.copy(conv.bias, f"{prefix}.bias")

    def norm(self, norm, prefix):
        """Torch norm `prefix` -> Keras norm.

        `weight` goes to `gamma` (or to `scale`, for `RMSNormalization`) and
        `bias` to `beta` where the layer has one.
        """
        gamma = getattr(norm, "gamma", None)
        self.copy(norm.scale if gamma is None else gamma, f"{prefix}.weight")
        if getattr(norm, "beta", None) is not None:
            self.copy(norm.beta, f"{prefix}.bias")

    def finish(self):
        """Fail on unused checkpoint tensors, then on unassigned variables."""
        owner = type(self.layer).__name__
        unused = sorted(set(self.source.keys()) - self.used - self.ignore)
        if unused:
            raise ValueError(
                f"{len(unused)} checkpoint tensor(s) were not used by {owner}: "
                f"{unused[:20]}. Does the config (or prefix) match the checkpoint?"
            )
        unassigned = [v.path for v in self.layer.weights if id(v) not in self.assigned]
        if unassigned:
            raise ValueError(
                f"{len(unassigned)} {owner} variable(s) were left unassigned: "
                f"{unassigned[:20]}."
            )
