"""Stability AI single-file tensor names -> diffusers tensor names.

Stability's SD3 / SD3.5 checkpoints (`sd3_medium.safetensors`,
`sd3.5_large.safetensors`, ...) name the MMDiT as the reference code does
(`model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight`) and the VAE
in the LDM layout (`first_stage_model.encoder.down.0.block.0.conv1.weight`).
`RenamedSource` presents such a checkpoint under diffusers' names, so the
diffusers converters (`diffusers_mmdit.load_mmdit`, `diffusers_vae.load_vae`)
load it unchanged. Each renamed tensor is still read lazily, one at a time,
with at most a cheap transformation applied on the way:

- a fused `qkv` projection is served as three row slices (`to_q`, `to_k`,
  `to_v`);
- the two-chunk AdaLN projections (`final_layer` and the last block's
  context modulation) are stored (shift, scale) by Stability and (scale,
  shift) by diffusers: their halves are swapped;
- the VAE attention's 1x1 convolutions (`q`, `k`, `v`, `proj_out`) are
  served as linear weights (trailing unit axes dropped);
- LDM decoder levels are numbered from the narrowest (`up.0`), diffusers'
  from the widest (`up_blocks.0`).

Names this module does not recognise keep their own name, so a loader's
"unused tensor" check reports them.

Examples:

>>> import numpy as np
>>> from keras_diffusion.converters.safetensors_reader import TensorSource
>>> source = TensorSource.from_dict({
...     "joint_blocks.0.x_block.attn.qkv.weight": np.arange(12.0).reshape(6, 2),
...     "final_layer.adaLN_modulation.1.bias": np.array([1.0, 2.0, 3.0, 4.0]),
... })
>>> view = RenamedSource(source, mmdit_names(source))
>>> sorted(view.keys())  # doctest: +NORMALIZE_WHITESPACE
['norm_out.linear.bias', 'transformer_blocks.0.attn.to_k.weight',
 'transformer_blocks.0.attn.to_q.weight', 'transformer_blocks.0.attn.to_v.weight']
>>> view.get("transformer_blocks.0.attn.to_k.weight").tolist()
[[4.0, 5.0], [6.0, 7.0]]
>>> view.get("norm_out.linear.bias").tolist()  # (shift, scale) -> (scale, shift)
[3.0, 4.0, 1.0, 2.0]
"""

import re

import numpy as np

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Whole-name renames of the MMDiT's embedders and final layer.
_MMDIT_FIXED = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
# Inside `joint_blocks.{i}`: (stream, part) -> diffusers name under
# `transformer_blocks.{i}`; `qkv` parts are split in three.
_BLOCK_PARTS = {
    ("x_block", "attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("context_block", "attn.qkv"): (
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
    ),
    ("x_block", "attn2.qkv"): ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ("x_block", "attn.ln_q"): "attn.norm_q",
    ("x_block", "attn.ln_k"): "attn.norm_k",
    ("context_block", "attn.ln_q"): "attn.norm_added_q",
    ("context_block", "attn.ln_k"): "attn.norm_added_k",
    ("x_block", "attn2.ln_q"): "attn2.norm_q",
    ("x_block", "attn2.ln_k"): "attn2.norm_k",
    ("x_block", "attn.proj"): "attn.to_out.0",
    ("context_block", "attn.proj"): "attn.to_add_out",
    ("x_block", "attn2.proj"): "attn2.to_out.0",
    ("x_block", "adaLN_modulation.1"): "norm1.linear",
    ("context_block", "adaLN_modulation.1"): "norm1_context.linear",
    ("x_block", "mlp.fc1"): "ff.net.0.proj",
    ("x_block", "mlp.fc2"): "ff.net.2",
    ("context_block", "mlp.fc1"): "ff_context.net.0.proj",
    ("context_block", "mlp.fc2"): "ff_context.net.2",
}
_BLOCK = re.compile(
    r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)$"
)


def _split(name):
    stem, _, leaf = name.rpartition(".")
    return stem, leaf


def mmdit_names(source):
    """`{diffusers name: (checkpoint name, transform)}` for an MMDiT source.

    `source` holds the reference implementation's names without the
    `model.diffusion_model.` prefix (use `source.scoped(MMDIT_PREFIX)`).
    A transform is None, `("rows", part, parts)` or `("swap",)`.
    """
    mapping = {}
    hidden = (
        source.shape("x_embedder.proj.weight")[0]
        if ("x_embedder.proj.weight" in source)
        else None
    )
    for name in source.keys():
        stem, leaf = _split(name)
        if name in _MMDIT_FIXED:
            mapping[_MMDIT_FIXED[name]] = (name, None)
        elif stem in _MMDIT_FIXED:
            mapping[f"{_MMDIT_FIXED[stem]}.{leaf}"] = (name, None)
        elif stem == "final_layer.adaLN_modulation.1":
            mapping[f"norm_out.linear.{leaf}"] = (name, ("swap",))
        elif match := _BLOCK.match(name):
            index, stream, part, leaf = match.groups()
            target = _BLOCK_PARTS.get((stream, part))
            if target is None:
                mapping[name] = (name, None)
                continue
            prefix = f"transformer_blocks.{index}"
            if isinstance(target, tuple):
                for i, t in enumerate(target):
                    mapping[f"{prefix}.{t}.{leaf}"] = (name, ("rows", i, 3))
                continue
            transform = None
            if part == "adaLN_modulation.1" and stream == "context_block":
                # The last block's context stream only has (shift, scale).
                if hidden is not None and source.shape(name)[0] == 2 * hidden:
                    transform = ("swap",)
            mapping[f"{prefix}.{target}.{leaf}"] = (name, transform)
        else:
            mapping[name] = (name, None)
    return mapping


_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}


def _vae_name(name, levels):
    """(diffusers name, transform) of one LDM VAE tensor name, or None."""
    parts = name.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return (name, None) if parts[0] in ("quant_conv", "post_quant_conv") else None
    rest = ".".join(parts[1:])
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{parts[-1]}", None
    if rest.split(".")[0] in ("conv_in", "conv_out"):
        return name, None
    match = re.match(
        r"^(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$", rest
    )
    if match:
        kind, level, what, index, tail = match.groups()
        level = int(level)
        if kind == "up":  # LDM counts decoder levels from the narrowest
            level = levels - 1 - level
        base = f"{side}.{kind}_blocks.{level}"
        if index is not None:
            layer, leaf = tail.split(".", 1) if "." in tail else (tail, "")
            return f"{base}.resnets.{index}.{_RESNET.get(layer, layer)}.{leaf}", None
        return f"{base}.{what}rs.0.{tail}", None
    match = re.match(r"^mid\.(block_(\d)|attn_1)\.(.+)$", rest)
    if match:
        _, index, tail = match.groups()
        if index is not None:
            layer, leaf = tail.split(".", 1)
            layer = _RESNET.get(layer, layer)
            return f"{side}.mid_block.resnets.{int(index) - 1}.{layer}.{leaf}", None
        layer, leaf = tail.split(".", 1)
        if layer not in _ATTENTION:
            return None
        transform = ("squeeze",) if leaf == "weight" and layer != "norm" else None
        return f"{side}.mid_block.attentions.0.{_ATTENTION[layer]}.{leaf}", transform
    return None


def vae_levels(source):
    """Number of resolution levels of an LDM VAE (`encoder.down.{i}`)."""
    found = {
        int(m.group(1))
        for k in source.keys()
        if (m := re.match(r"^encoder\.down\.(\d+)\.", k))
    }
    return max(found) + 1 if found else 0


def vae_names(source):
    """`{diffusers name: (checkpoint name, transform)}` for an LDM VAE source.

    `source` holds the LDM names without `first_stage_model.`.
    """
    levels = vae_levels(source)
    mapping = {}
    for name in source.keys():
        renamed = _vae_name(name, levels)
        target, transform = renamed if renamed else (name, None)
        mapping[target] = (name, transform)
    return mapping


def mmdit_reference_name(name):
    """The reference name a diffusers MMDiT tensor name comes from, or None.

    Examples:

    >>> mmdit_reference_name("transformer_blocks.1.attn.to_k.weight")
    'joint_blocks.1.x_block.attn.qkv.weight'
    """
    stem, leaf = _split(name)
    fixed = {v: k for k, v in _MMDIT_FIXED.items()}
    if name in fixed:
        return fixed[name]
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    if stem == "norm_out.linear":
        return f"final_layer.adaLN_modulation.1.{leaf}"
    match = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", stem)
    if match:
        index, part = match.groups()
        for (stream, reference), target in _BLOCK_PARTS.items():
            if part == target or (isinstance(target, tuple) and part in target):
                return f"joint_blocks.{index}.{stream}.{reference}.{leaf}"
    return None


def vae_reference_name(name, levels):
    """The LDM name a diffusers VAE tensor name comes from, or None.

    Examples:

    >>> vae_reference_name("decoder.up_blocks.0.resnets.1.conv_shortcut.bias", 4)
    'decoder.up.3.block.1.nin_shortcut.bias'
    """
    resnet = {v: k for k, v in _RESNET.items()}
    attention = {v: k for k, v in _ATTENTION.items()}
    side, _, rest = name.partition(".")
    match = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|\w+samplers\.0)\.(.+)$", rest)
    if match:
        kind, level, what, tail = match.groups()
        level = levels - 1 - int(level) if kind == "up" else int(level)
        if what != "resnets":
            return f"{side}.{kind}.{level}.{kind}sample.{tail}"
        index, layer, leaf = tail.split(".", 2)
        return f"{side}.{kind}.{level}.block.{index}.{resnet.get(layer, layer)}.{leaf}"
    match = re.match(r"^mid_block\.resnets\.(\d)\.(\w+)\.(\w+)$", rest)
    if match:
        index, layer, leaf = match.groups()
        layer = resnet.get(layer, layer)
        return f"{side}.mid.block_{int(index) + 1}.{layer}.{leaf}"
    match = re.match(r"^mid_block\.attentions\.0\.(.+)\.(\w+)$", rest)
    if match and match.group(1) in attention:
        return f"{side}.mid.attn_1.{attention[match.group(1)]}.{match.group(2)}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.split('.')[-1]}"
    return name


class RenamedSource:
    """A `TensorSource` view under other names, with light transforms.

    Args:
        source: the underlying `TensorSource` (or another view).
        mapping: `{new name: (source name, transform)}`, e.g. from
            `mmdit_names(source)`; `(None, ("eye", n))` serves an `(n, n)`
            identity matrix that the checkpoint does not store.

        reference: optional `new name -> checkpoint name` function, used
            to name a missing tensor as the checkpoint would have it.

    Offers what the converters use: `keys`, `in`, `shape` (from the
    header alone) and `get` (reads the underlying tensor, returns a fresh
    array).
    """

    def __init__(self, source, mapping, reference=None):
        self._source = source
        self._mapping = dict(mapping)
        self._reference = reference

    def keys(self):
        return list(self._mapping)

    def __contains__(self, name):
        return name in self._mapping

    def __len__(self):
        return len(self._mapping)

    def _lookup(self, name):
        if name not in self._mapping:
            original = self._reference(name) if self._reference else None
            what = f"{original!r} (diffusers {name!r})" if original else repr(name)
            raise KeyError(
                f"Tensor {what} is missing from the checkpoint "
                f"({len(self._mapping)} tensors present)."
            )
        return self._mapping[name]

    def explain(self, message, prefix=""):
        """`message` with each quoted new name replaced by its checkpoint name.

        Examples:

        >>> view = RenamedSource(None, {"proj_out.weight": ("final.w", None)})
        >>> view.explain("Tensor 'proj_out.weight' has shape (2,).", "model.")
        "Tensor 'model.final.w' has shape (2,)."
        """

        def replace(match):
            original, transform = self._mapping.get(match.group(1), (None, None))
            if original is None:
                return match.group(0)
            if transform is None:
                return f"'{prefix}{original}'"
            return f"'{prefix}{original}' (as diffusers {match.group(0)})"

        return re.sub(r"'([\w.]+)'", replace, message)

    def shape(self, name):
        original, transform = self._lookup(name)
        if original is None:  # ("eye", n): an identity matrix, not stored
            return (transform[1], transform[1])
        shape = tuple(self._source.shape(original))
        if transform is None or transform[0] == "swap":
            return shape
        if transform[0] == "rows":
            return (shape[0] // transform[2],) + shape[1:]
        return shape[:2] + tuple(s for s in shape[2:] if s != 1)  # squeeze

    def get(self, name):
        original, transform = self._lookup(name)
        if original is None:
            return np.eye(transform[1], dtype=np.float32)
        array = self._source.get(original)
        if transform is None:
            return array
        kind = transform[0]
        if kind == "rows":
            _, part, parts = transform
            if array.shape[0] % parts:
                raise ValueError(
                    f"Checkpoint tensor {original!r} of shape {array.shape} cannot "
                    f"be split into {parts} equal projections."
                )
            size = array.shape[0] // parts
            return np.ascontiguousarray(array[part * size : (part + 1) * size])
        if kind == "swap":
            if array.shape[0] % 2:
                raise ValueError(
                    f"Checkpoint tensor {original!r} of shape {array.shape} has no "
                    "(shift, scale) halves."
                )
            half = array.shape[0] // 2
            return np.concatenate([array[half:], array[:half]], axis=0)
        return array.reshape(self.shape(name))
