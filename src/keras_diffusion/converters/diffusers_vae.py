"""Load a diffusers `AutoencoderKL` checkpoint (SD3's `vae/`) into `VAE`.

`vae_kwargs(config)` turns `vae/config.json` into `VAE` arguments;
`load_vae(vae, source)` copies `diffusion_pytorch_model.safetensors` into
it, by diffusers' state-dict names, and fails loudly on anything missing,
misshapen, unassigned or left over.
"""

from keras_diffusion.converters.safetensors_reader import assign

_REQUIRED = ("block_out_channels", "layers_per_block", "latent_channels")
# diffusers' `AutoencoderKL.__init__` defaults, for keys a config may omit.
_DEFAULTS = {
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
}


def vae_kwargs(diffusers_config):
    """`VAE` constructor arguments from a diffusers `AutoencoderKL` config.

    Args:
        diffusers_config: dict, the parsed `vae/config.json`.

    Returns:
        A dict for `VAE(**kwargs)`.

    Raises:
        ValueError: a required key is missing, or the config asks for an
            architecture this `VAE` does not implement.

    Examples:

    >>> config = {
    ...     "block_out_channels": [128, 256, 512, 512],
    ...     "layers_per_block": 2,
    ...     "latent_channels": 16,
    ...     "norm_num_groups": 32,
    ...     "scaling_factor": 1.5305,
    ...     "shift_factor": 0.0609,
    ...     "use_quant_conv": False,
    ...     "use_post_quant_conv": False,
    ... }
    >>> vae_kwargs(config)["decoder_layers_per_block"]
    3
    """
    missing = [k for k in _REQUIRED if k not in diffusers_config]
    if missing:
        raise ValueError(f"The diffusers VAE config lacks required keys {missing}.")
    config = {**_DEFAULTS, **diffusers_config}
    n = len(config["block_out_channels"])
    expected = {
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu",
        "in_channels": 3,
        "out_channels": 3,
        "mid_block_add_attention": True,
        "latents_mean": None,
        "latents_std": None,
    }
    for key, value in expected.items():
        got = config.get(key, value)
        if isinstance(got, tuple):
            got = list(got)
        if got != value:
            raise ValueError(
                f"Unsupported diffusers VAE config: {key}={got!r}; this VAE "
                f"implements only {key}={value!r}."
            )
    shift = config["shift_factor"]
    return {
        "block_channels": tuple(int(c) for c in config["block_out_channels"]),
        "encoder_layers_per_block": int(config["layers_per_block"]),
        "decoder_layers_per_block": int(config["layers_per_block"]) + 1,
        "latent_channels": int(config["latent_channels"]),
        "norm_groups": int(config["norm_num_groups"]),
        "scaling_factor": float(config["scaling_factor"]),
        "shift_factor": 0.0 if shift is None else float(shift),
        "use_quant_conv": bool(config["use_quant_conv"]),
        "use_post_quant_conv": bool(config["use_post_quant_conv"]),
    }


class _Loader:
    """Copies named tensors into variables, remembering what was used."""

    def __init__(self, source):
        self.source = source
        self.used = set()
        self.assigned = set()

    def _put(self, variable, name, transform=None):
        array = self.source.get(name)
        if transform is not None:
            array = transform(array)
        assign(variable, array, name)
        self.used.add(name)
        self.assigned.add(id(variable))

    def conv(self, layer, prefix):
        # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        self._put(layer.kernel, f"{prefix}.weight", _conv_kernel)
        self._put(layer.bias, f"{prefix}.bias")

    def dense(self, layer, prefix):
        # torch (out, in) -> keras (in, out)
        self._put(layer.kernel, f"{prefix}.weight", _dense_kernel)
        self._put(layer.bias, f"{prefix}.bias")

    def norm(self, layer, prefix):
        self._put(layer.gamma, f"{prefix}.weight")
        self._put(layer.beta, f"{prefix}.bias")

    def resnet(self, block, prefix):
        self.norm(block.norm1, f"{prefix}.norm1")
        self.conv(block.conv1, f"{prefix}.conv1")
        self.norm(block.norm2, f"{prefix}.norm2")
        self.conv(block.conv2, f"{prefix}.conv2")
        if block.conv_shortcut is not None:
            self.conv(block.conv_shortcut, f"{prefix}.conv_shortcut")

    def mid_block(self, block, prefix):
        self.resnet(block.resnet_0, f"{prefix}.resnets.0")
        attention = block.attention
        at = f"{prefix}.attentions.0"
        self.norm(attention.group_norm, f"{at}.group_norm")
        for layer, name in (
            (attention.to_q, "to_q"),
            (attention.to_k, "to_k"),
            (attention.to_v, "to_v"),
            (attention.to_out, "to_out.0"),
        ):
            self.dense(layer, f"{at}.{name}")
        self.resnet(block.resnet_1, f"{prefix}.resnets.1")


def _conv_kernel(array):
    if array.ndim != 4:
        return array  # let `assign` report the shape mismatch
    return array.transpose(2, 3, 1, 0)


def _dense_kernel(array):
    if array.ndim != 2:
        return array  # let `assign` report the shape mismatch
    return array.T


def load_vae(vae, source):
    """Copy a diffusers `AutoencoderKL` state dict into `vae`.

    Args:
        vae: a `VAE` built with `vae_kwargs` of the checkpoint's config.
        source: a `TensorSource` whose names are diffusers' (`encoder.*`,
            `decoder.*`, `quant_conv.*`, `post_quant_conv.*`); use
            `source.scoped(prefix)` for a single-file checkpoint.

    Raises:
        KeyError: a tensor the model needs is missing (named).
        ValueError: a tensor has the wrong shape, a checkpoint tensor is
            left unused, or a model variable is left unassigned (all named).

    Examples:

    >>> import numpy as np
    >>> from keras_diffusion.models.stable_diffusion_3.vae import VAE
    >>> from keras_diffusion.converters.safetensors_reader import TensorSource
    >>> vae = VAE(block_channels=(8, 16), norm_groups=4)
    >>> load_vae(vae, TensorSource.from_dict({}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    KeyError: "Tensor 'encoder.conv_in.weight' is missing from the checkpoint ..."
    """
    if not vae.built:
        vae.build()
    loader = _Loader(source)
    encoder, decoder = vae.encoder, vae.decoder

    loader.conv(encoder.conv_in, "encoder.conv_in")
    for i, level in enumerate(encoder.down_resnets):
        for j, resnet in enumerate(level):
            loader.resnet(resnet, f"encoder.down_blocks.{i}.resnets.{j}")
        if i < len(encoder.downsamplers):
            prefix = f"encoder.down_blocks.{i}.downsamplers.0.conv"
            loader.conv(encoder.downsamplers[i].conv, prefix)
    loader.mid_block(encoder.mid_block, "encoder.mid_block")
    loader.norm(encoder.norm_out, "encoder.conv_norm_out")
    loader.conv(encoder.conv_out, "encoder.conv_out")
    if encoder.quant_conv is not None:
        loader.conv(encoder.quant_conv, "quant_conv")

    if decoder.post_quant_conv is not None:
        loader.conv(decoder.post_quant_conv, "post_quant_conv")
    loader.conv(decoder.conv_in, "decoder.conv_in")
    loader.mid_block(decoder.mid_block, "decoder.mid_block")
    # diffusers numbers up_blocks in decoding order, widest level first,
    # which is also the order of `up_resnets`.
    for i, level in enumerate(decoder.up_resnets):
        for j, resnet in enumerate(level):
            loader.resnet(resnet, f"decoder.up_blocks.{i}.resnets.{j}")
        if i < len(decoder.upsamplers):
            prefix = f"decoder.up_blocks.{i}.upsamplers.0.conv"
            loader.conv(decoder.upsamplers[i].conv, prefix)
    loader.norm(decoder.norm_out, "decoder.conv_norm_out")
    loader.conv(decoder.conv_out, "decoder.conv_out")

    unused = sorted(set(source.keys()) - loader.used)
    if unused:
        raise ValueError(
            f"{len(unused)} checkpoint tensors were not used by the VAE "
            f"(first: {unused[:5]}); the config does not match the checkpoint."
        )
    unassigned = [v.path for v in vae.weights if id(v) not in loader.assigned]
    if unassigned:
        raise ValueError(f"VAE variables left unassigned: {unassigned[:5]}.")
