"""LoRA adapters on a backbone's `Dense` layers, built on `Dense.enable_lora`.

A LoRA of rank `r` adds a trainable low-rank update to a frozen kernel `W`
`(in, out)`: the layer computes `x @ (W + (alpha / r) * A @ B)` with
`A (in, r)` (He-uniform) and `B (r, out)` (zeros), so a fresh adapter leaves
the model unchanged. Targets are `Dense` layers named by their path under
the backbone (`"mmdit/block_0/x_qkv"`), matched with shell-style globs.

Saving differs from Keras' default on purpose. A plain `Dense` with LoRA
saves its kernel merged and zeroes `A` and `B` on load, so a reloaded
adapter is dead (both factors zero: no gradient reaches either). Here an
adapted layer saves its base kernel and bias as a plain `Dense` does
(entries "0" and "1") plus `lora_kernel_a` / `lora_kernel_b`, and loads
them back as they were: `save_weights`, presets and `.keras` archives
round-trip the adapter exactly. Weights of a plain (LoRA-free) model load
into an adapted one and leave its adapter as it was; adapted weights do
not load into a plain model (Keras reports the extra entries).

Examples:
```python
backbone = keras_diffusion.models.Backbone.from_preset("sd3_tiny_demo")
backbone.enable_lora(4)  # the backbone's default targets
keras_diffusion.models.lora.lora_layer_paths(backbone)
# ['mmdit/block_0/x_qkv', 'mmdit/block_0/context_qkv', ...]
```
"""

import fnmatch
import json

import keras
import numpy as np
from keras import ops

LORA_FORMAT = "keras_diffusion.lora"
_FACTORS = ("lora_kernel_a", "lora_kernel_b")


class LoRADense(keras.layers.Dense):
    """A `Dense` whose LoRA adapter is saved unmerged (see the module doc).

    `enable` turns an existing, built `Dense` into one in place; this class
    is never constructed directly, and never appears in a config.
    """

    def save_own_variables(self, store):
        store["0"] = self._kernel
        if self.bias is not None:
            store["1"] = self.bias
        store["lora_kernel_a"] = self.lora_kernel_a
        store["lora_kernel_b"] = self.lora_kernel_b

    def load_own_variables(self, store):
        expected = {"0", "1"} if self.bias is not None else {"0"}
        keys = set(store.keys())
        if not expected <= keys or keys - expected - set(_FACTORS):
            raise ValueError(
                f"Layer {self.name!r} (LoRA) expected entries {sorted(expected)} "
                f"and optionally {list(_FACTORS)}; found {sorted(keys)}."
            )
        self._kernel.assign(store["0"])
        if self.bias is not None:
            self.bias.assign(store["1"])
        if "lora_kernel_a" in keys:
            self.lora_kernel_a.assign(store["lora_kernel_a"])
            self.lora_kernel_b.assign(store["lora_kernel_b"])


def dense_layers(model):
    """`{path: layer}` of every `Dense` under `model`, paths joined by "/"."""
    found = {}

    def walk(layer, prefix):
        for child in layer._layers:
            path = f"{prefix}{child.name}"
            if isinstance(child, keras.layers.Dense):
                found[path] = child
            walk(child, path + "/")

    walk(model, "")
    return found


def resolve_targets(model, target_layers):
    """Glob patterns (or exact paths) -> the sorted list of matching paths."""
    if isinstance(target_layers, str):
        target_layers = [target_layers]
    target_layers = list(target_layers)
    if not target_layers:
        raise ValueError("`target_layers` must name at least one Dense layer.")
    layers = dense_layers(model)
    matched = set()
    for pattern in target_layers:
        hits = [p for p in layers if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            examples = ", ".join(sorted(layers)[:6])
            raise ValueError(
                f"LoRA target {pattern!r} matches no Dense layer of "
                f"{model.name!r}. Paths look like: {examples}, ..."
            )
        matched.update(hits)
    return sorted(matched, key=_natural_key)


def _natural_key(path):
    """Sort "block_10" after "block_9"."""
    parts = path.replace("_", "/").split("/")
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts]


def lora_layer_paths(model):
    """Paths of the layers that carry a LoRA adapter, in a stable order."""
    adapted = [p for p, layer in dense_layers(model).items() if layer.lora_enabled]
    return sorted(adapted, key=_natural_key)


def lora_variables(model):
    """The LoRA factors of `model`, `A` then `B` of each adapted layer."""
    layers = dense_layers(model)
    return [
        getattr(layers[p], name) for p in lora_layer_paths(model) for name in _FACTORS
    ]


def enable(model, rank, target_layers, alpha=None):
    """Add rank-`rank` adapters to the target layers and train only them.

    Returns the config to record: `{"rank", "alpha", "target_layers"}` with
    the resolved layer paths.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive int; got {rank!r}.")
    alpha = float(rank if alpha is None else alpha)
    paths = resolve_targets(model, target_layers)
    layers = dense_layers(model)
    for path in paths:
        layer = layers[path]
        if layer.lora_enabled:
            raise ValueError(f"Layer {path!r} already has a LoRA adapter.")
        if layer.quantization_mode is not None:
            raise ValueError(f"Layer {path!r} is quantized; LoRA needs a float kernel.")
    for path in paths:
        layers[path].enable_lora(rank, lora_alpha=alpha)
        layers[path].__class__ = LoRADense
    freeze_all_but_lora(model)
    return {"rank": rank, "alpha": alpha, "target_layers": paths}


def freeze_all_but_lora(model):
    """Make the LoRA factors the only trainable weights of `model`.

    The previous flags of the other weights are remembered; `merge` restores
    them. (A LoRA factor is trainable even inside a frozen component.)
    """
    factors = {id(v) for v in lora_variables(model)}
    model._lora_restore_flags = {
        id(v): v.trainable for v in model.variables if id(v) not in factors
    }
    for v in model.variables:
        v.trainable = id(v) in factors


def merge(model):
    """Fold every adapter into its kernel and remove the LoRA factors."""
    restore = getattr(model, "_lora_restore_flags", {})
    for layer in dense_layers(model).values():
        if not layer.lora_enabled:
            continue
        scale = layer.lora_alpha / layer.lora_rank
        delta = scale * ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
        kernel = ops.cast(layer._kernel, "float32") + delta
        layer._kernel.assign(ops.cast(kernel, layer._kernel.dtype))
        for name in _FACTORS:
            layer._untrack_variable(getattr(layer, name))
            object.__delattr__(layer, name)
        layer.lora_enabled = False
        layer.lora_rank = None
        layer.lora_alpha = None
        layer.__class__ = keras.layers.Dense
    for v in model.variables:
        v.trainable = restore.get(id(v), v.trainable)
    model._lora_restore_flags = {}


def save_factors(model, path, config):
    """Write the LoRA factors to a safetensors file, config in its metadata."""
    from safetensors.numpy import save_file

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"LoRA weights are saved as .safetensors; got {path!r}.")
    layers = dense_layers(model)
    tensors = {
        f"{p}/{name}": np.ascontiguousarray(
            keras.ops.convert_to_numpy(getattr(layers[p], name))
        )
        for p in config["target_layers"]
        for name in _FACTORS
    }
    metadata = {"format": LORA_FORMAT, "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)


def read_factors(path):
    """`(config, {name: array})` from a file written by `save_factors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != LORA_FORMAT:
            raise ValueError(
                f"{path!r} is not a keras_diffusion LoRA file (metadata format "
                f"{metadata.get('format')!r})."
            )
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return json.loads(metadata["config"]), tensors


def assign_factors(model, tensors):
    """Assign every LoRA factor from `tensors`; fail on missing/unused/shape."""
    layers = dense_layers(model)
    expected = {
        f"{p}/{name}": getattr(layers[p], name)
        for p in lora_layer_paths(model)
        for name in _FACTORS
    }
    missing = sorted(set(expected) - set(tensors))
    unused = sorted(set(tensors) - set(expected))
    if missing or unused:
        raise ValueError(
            f"LoRA weights do not match the model: missing {missing[:4]}, "
            f"unused {unused[:4]}."
        )
    for key, variable in expected.items():
        if tuple(tensors[key].shape) != tuple(variable.shape):
            raise ValueError(
                f"LoRA tensor {key!r} has shape {tuple(tensors[key].shape)}; "
                f"the model expects {tuple(variable.shape)}."
            )
        variable.assign(tensors[key])
