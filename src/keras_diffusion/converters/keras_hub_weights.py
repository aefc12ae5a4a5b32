"""Read a keras-hub SD3 `model.weights.h5` as transformers / diffusers tensors.

Keras 3 saves a model's weights in an HDF5 tree keyed by object path, not by
layer name: `layers/<class name in snake case>[_<n>]/.../vars/<i>`, where
`_<n>` numbers the n-th object of the same class in its container
(`layers/clip_text_encoder_1/...` is the second `CLIPTextEncoder`). Sharded
weights keep the same tree split over several `.h5` files listed in
`model.weights.json`.

`KerasWeights` opens those files read-only with h5py (never unpickling or
executing anything: links, external and virtual datasets and non-numeric
data are refused) and indexes every dataset. `clip_source`, `mmdit_source`
and `vae_source` then present one component's datasets under the tensor
names and torch layouts of transformers / diffusers checkpoints, read lazily
one tensor at a time, so the loaders that import diffusers checkpoints
(`transformers_text.load_clip_text_encoder`, `diffusers_mmdit.load_mmdit`,
`diffusers_vae.load_vae`) import keras-hub weights too, with all their
checks (every tensor used, every variable assigned, every shape right).
`KerasWeights.unused()` names the datasets no component read.

Examples:

>>> unique_name("res_net_block", 0), unique_name("res_net_block", 2)
('res_net_block', 'res_net_block_2')
"""

import json
import os
import re

import ml_dtypes
import numpy as np

_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.h5$")


def unique_name(base, index):
    """Keras' saving name of the `index`-th object of a class in a container."""
    return base if index == 0 else f"{base}_{index}"


class KerasWeights:
    """Every dataset of a Keras weights file (or of its shards), by path.

    Args:
        path: `model.weights.h5`, or the `model.weights.json` of sharded
            weights (its shards must sit next to it).
    """

    def __init__(self, path):
        import h5py

        self.path = os.fspath(path)
        self._h5py = h5py
        self._datasets = {}  # "layers/.../vars/0" -> shard path
        self._used = set()
        for shard in self._shards():
            with h5py.File(shard, "r") as f:
                self._index(f, "", shard)
        if not self._datasets:
            raise ValueError(f"{self.path} holds no weights.")

    def _shards(self):
        if not self.path.endswith(".json"):
            return [self.path]
        try:
            with open(self.path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = set()
            for value in weight_map.values():
                names.update(value if isinstance(value, list) else [value])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.path} is not a Keras shard index: {e}") from e
        folder = os.path.dirname(self.path)
        shards = []
        for name in sorted(names):
            if not isinstance(name, str) or not _SHARD_NAME.match(name):
                raise ValueError(f"{self.path} names an invalid shard file {name!r}.")
            shard = os.path.join(folder, name)
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"Weight shard {name!r} is missing ({shard}).")
            shards.append(shard)
        return shards

    def _index(self, group, prefix, shard):
        h5py = self._h5py
        for name in group:
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise ValueError(f"{shard}: link {prefix}{name} is not allowed.")
            item = group[name]
            key = f"{prefix}{name}"
            if isinstance(item, h5py.Group):
                self._index(item, key + "/", shard)
                continue
            if item.external or item.is_virtual or item.dtype.kind not in "fiuV":
                raise ValueError(f"{shard}: dataset {key} is not plain numeric data.")
            if key in self._datasets:
                raise ValueError(f"Dataset {key} appears in two shards.")
            self._datasets[key] = shard

    def groups(self, prefix):
        """Names of the child groups of `prefix` (a `/`-terminated path)."""
        n = len(prefix)
        return sorted(
            {k[n:].split("/")[0] for k in self._datasets if k.startswith(prefix)}
        )

    def has(self, key):
        return key in self._datasets

    def shape(self, key):
        with self._h5py.File(self._file(key), "r") as f:
            return tuple(f[key].shape)

    def read(self, key):
        self._used.add(key)
        with self._h5py.File(self._file(key), "r") as f:
            dataset = f[key]
            value = np.asarray(dataset[()])
            if dataset.attrs.get("dtype") == "bfloat16" or value.dtype.kind == "V":
                value = value.view(ml_dtypes.bfloat16)
        return value

    def _file(self, key):
        if key not in self._datasets:
            raise KeyError(f"Weight {key!r} is missing from {self.path}.")
        return self._datasets[key]

    def unused(self):
        return sorted(set(self._datasets) - self._used)


class _Tensor:
    """A checkpoint tensor computed from one dataset: `fn(array)`."""

    def __init__(self, key, fn=None):
        self.key, self.fn = key, fn or (lambda a: a)


# Keras layouts -> torch layouts (all views, except `_swap`'s copy).
_T = np.transpose  # Dense kernel (in, out) -> Linear (out, in)


def _conv(a):  # (kh, kw, in, out) -> (out, in, kh, kw)
    return a.transpose(3, 2, 0, 1)


def _conv_as_linear(a):  # 1x1 conv (1, 1, in, out) -> Linear (out, in)
    return a[0, 0].T


def _flat(a):  # MultiHeadAttention bias (heads, head_dim) -> (dim,)
    return a.reshape(-1)


def _heads_in(a):  # MHA q/k/v kernel (dim, heads, head_dim) -> (dim, dim)
    return a.reshape(a.shape[0], -1).T


def _heads_out(a):  # MHA output kernel (heads, head_dim, dim) -> (dim, dim)
    return a.reshape(-1, a.shape[-1]).T


def _part(index, parts, kernel):
    """One of `parts` equal column blocks of a fused kernel (or bias)."""

    def fn(a):
        width = a.shape[-1] // parts
        block = a[..., index * width : (index + 1) * width]
        return block.T if kernel else block

    return fn


def _swap(kernel):
    """keras-hub's 2-chunk AdaLN is (shift, scale); diffusers' is (scale, shift)."""

    def fn(a):
        half = a.shape[-1] // 2
        a = np.concatenate([a[..., half:], a[..., :half]], axis=-1)
        return a.T if kernel else a

    return fn


class ComponentSource:
    """A `TensorSource`-like view: checkpoint name -> tensor of a dataset."""

    def __init__(self, weights, tensors):
        self.weights = weights
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def __contains__(self, name):
        return name in self.tensors

    def __len__(self):
        return len(self.tensors)

    def _get(self, name):
        if name not in self.tensors:
            raise KeyError(
                f"Tensor {name!r} is missing from the converted keras-hub weights."
            )
        return self.tensors[name]

    def shape(self, name):
        tensor = self._get(name)
        # Applied to an untouched placeholder, the transform gives the shape.
        placeholder = np.empty(self.weights.shape(tensor.key), np.int8)
        return tuple(tensor.fn(placeholder).shape)

    def get(self, name):
        tensor = self._get(name)
        return np.ascontiguousarray(tensor.fn(self.weights.read(tensor.key)))


def _dense(t, name, root, fn=_T, bias=True):
    t[f"{name}.weight"] = _Tensor(f"{root}/vars/0", fn)
    if bias:
        t[f"{name}.bias"] = _Tensor(f"{root}/vars/1")


def _norm(t, name, root, bias=True):
    _dense(t, name, root, fn=None, bias=bias)


def clip_source(weights, root, projection, num_layers):
    """A keras-hub `CLIPTextEncoder` (+ its SD3 projection), transformers names."""
    t = {}
    embedding = f"{root}/layers/token_and_position_embedding"
    for kind in ("token", "position"):
        key = f"{embedding}/{kind}_embedding/vars/0"
        t[f"text_model.embeddings.{kind}_embedding.weight"] = _Tensor(key)
    for i in range(num_layers):
        layer = f"{root}/layers/{unique_name('clip_encoder_layer', i)}"
        name = f"text_model.encoder.layers.{i}"
        attention = f"{layer}/attention"
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            proj = f"{name}.self_attn.{ours}_proj"
            t[f"{proj}.weight"] = _Tensor(
                f"{attention}/{theirs}_dense/vars/0", _heads_in
            )
            t[f"{proj}.bias"] = _Tensor(f"{attention}/{theirs}_dense/vars/1", _flat)
        _dense(t, f"{name}.self_attn.out_proj", f"{attention}/output_dense", _heads_out)
        _norm(t, f"{name}.layer_norm1", f"{layer}/layer_norm_1")
        _norm(t, f"{name}.layer_norm2", f"{layer}/layer_norm_2")
        _dense(t, f"{name}.mlp.fc1", f"{layer}/dense_1")
        _dense(t, f"{name}.mlp.fc2", f"{layer}/dense_2")
    _norm(t, "text_model.final_layer_norm", f"{root}/layers/layer_normalization")
    _dense(t, "text_projection", f"{projection}/dense", bias=False)
    return ComponentSource(weights, t)


def _fused(t, names, root):
    """Split a fused q/k/v Dense into diffusers' three Linears."""
    for index, name in enumerate(names):
        t[f"{name}.weight"] = _Tensor(f"{root}/vars/0", _part(index, 3, True))
        t[f"{name}.bias"] = _Tensor(f"{root}/vars/1", _part(index, 3, False))


def _mlp(t, name, root):
    _dense(t, f"{name}.net.0.proj", f"{root}/dense1")
    _dense(t, f"{name}.net.2", f"{root}/dense2")


def _swapped(t, name, root):
    t[f"{name}.weight"] = _Tensor(f"{root}/vars/0", _swap(kernel=True))
    t[f"{name}.bias"] = _Tensor(f"{root}/vars/1", _swap(kernel=False))


def mmdit_source(weights, root, num_layers, dual_attention, context, output):
    """A keras-hub `MMDiT` under diffusers' `SD3Transformer2DModel` names.

    `context` / `output` name the top-level Dense groups of the context
    embedding and of the output projection (both saved as `dense*`).
    """
    t = {}
    layers = f"{root}/layers"
    _dense(t, "pos_embed.proj", f"{layers}/patch_embedding/patch_embedding", _conv)
    t["pos_embed.pos_embed"] = _Tensor(
        f"{layers}/adjustable_position_embedding/vars/0", lambda a: a[None]
    )
    for i in (1, 2):
        timestep = f"time_text_embed.timestep_embedder.linear_{i}"
        _dense(t, timestep, f"{layers}/timestep_embedding/mlp/dense{i}")
        _dense(t, f"time_text_embed.text_embedder.linear_{i}", f"{layers}/mlp/dense{i}")
    _dense(t, "context_embedder", f"{layers}/{context}")
    for i in range(num_layers):
        block = f"{layers}/{unique_name('mm_di_t_block', i)}"
        x, c = f"{block}/x_block", f"{block}/context_block"
        b = f"transformer_blocks.{i}"
        last = i == num_layers - 1
        _dense(t, f"{b}.norm1.linear", f"{x}/ada_layer_norm/dense")
        # The last block's context AdaLN has 2 chunks: reorder them.
        (_swapped if last else _dense)(
            t, f"{b}.norm1_context.linear", f"{c}/ada_layer_norm/dense"
        )
        _fused(t, [f"{b}.attn.to_{s}" for s in "qkv"], f"{x}/attention_qkv")
        _fused(t, [f"{b}.attn.add_{s}_proj" for s in "qkv"], f"{c}/attention_qkv")
        norms = [(".norm_q", x, "q_norm"), (".norm_k", x, "k_norm")]
        norms += [(".norm_added_q", c, "q_norm"), (".norm_added_k", c, "k_norm")]
        if i in dual_attention:
            _fused(t, [f"{b}.attn2.to_{s}" for s in "qkv"], f"{x}/attention_qkv2")
            _dense(t, f"{b}.attn2.to_out.0", f"{x}/attention_proj2")
            norms += [("2.norm_q", x, "q_norm2"), ("2.norm_k", x, "k_norm2")]
        for ours, side, theirs in norms:
            if weights.has(f"{side}/{theirs}/vars/0"):  # with qk_norm only
                _norm(t, f"{b}.attn{ours}", f"{side}/{theirs}", bias=False)
        _dense(t, f"{b}.attn.to_out.0", f"{x}/attention_proj")
        _mlp(t, f"{b}.ff", f"{x}/mlp")
        if not last:
            _dense(t, f"{b}.attn.to_add_out", f"{c}/attention_proj")
            _mlp(t, f"{b}.ff_context", f"{c}/mlp")
    _swapped(t, "norm_out.linear", f"{layers}/adaptive_layer_normalization/dense")
    _dense(t, "proj_out", f"{layers}/{output}")
    return ComponentSource(weights, t)


def _resnet(t, name, root, weights):
    for part in ("norm1", "conv1", "norm2", "conv2"):
        (_norm if part.startswith("norm") else _conv_dense)(
            t, f"{name}.{part}", f"{root}/{part}"
        )
    if weights.has(f"{root}/residual_projection/vars/0"):
        _conv_dense(t, f"{name}.conv_shortcut", f"{root}/residual_projection")


def _conv_dense(t, name, root):
    _dense(t, name, root, _conv)


def _vae_half(t, weights, side, root, blocks, resamples):
    """Encoder or decoder: levels of resnets with their down/upsampling convs."""
    _conv_dense(t, f"{side}.conv_in", f"{root}/input_projection")
    mid = f"{side}.mid_block"
    _resnet(t, f"{mid}.resnets.0", f"{root}/mid_block_0", weights)
    _resnet(t, f"{mid}.resnets.1", f"{root}/mid_block_1", weights)
    attention = f"{root}/mid_attention"
    _norm(t, f"{mid}.attentions.0.group_norm", f"{attention}/group_norm")
    for ours, theirs in (
        ("q", "query"),
        ("k", "key"),
        ("v", "value"),
        ("out.0", "output"),
    ):
        conv = f"{attention}/{theirs}_conv2d"
        _dense(t, f"{mid}.attentions.0.to_{ours}", conv, _conv_as_linear)
    levels, sampler = (
        ("down_blocks", "downsamplers")
        if side == "encoder"
        else ("up_blocks", "upsamplers")
    )
    k = 0
    for i, count in enumerate(blocks):
        for j in range(count):
            block = f"{root}/blocks/{unique_name('res_net_block', k)}"
            _resnet(t, f"{side}.{levels}.{i}.resnets.{j}", block, weights)
            k += 1
        if i < len(blocks) - 1:  # Keras names the list's convs conv2d, conv2d_1, ...
            conv = f"{root}/{resamples}/{unique_name('conv2d', i)}"
            _conv_dense(t, f"{side}.{levels}.{i}.{sampler}.0.conv", conv)
    _norm(t, f"{side}.conv_norm_out", f"{root}/output_norm")
    _conv_dense(t, f"{side}.conv_out", f"{root}/output_projection")


def vae_source(weights, encoder_root, decoder_root, encoder_blocks, decoder_blocks):
    """keras-hub's `VAEEncoder` / `VAEDecoder` under `AutoencoderKL` names."""
    t = {}
    _vae_half(t, weights, "encoder", encoder_root, encoder_blocks, "downsamples")
    _vae_half(t, weights, "decoder", decoder_root, decoder_blocks, "upsamples")
    return ComponentSource(weights, t)
