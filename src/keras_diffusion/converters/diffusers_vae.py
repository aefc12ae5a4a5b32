"""Load a diffusers `AutoencoderKL` checkpoint (SD3's `vae/`) into `VAE`.

`vae_kwargs(config)` turns `vae/config.json` into `VAE` arguments;
`load_vae(vae, source)` copies `diffusion_pytorch_model.safetensors` into
it, by diffusers' state-dict names, and fails loudly on anything missing,
misshapen, unassigned or left over.
"""

from keras_diffusion.converters.weight_loader import WeightLoader

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


def _resnet(load, block, prefix):
    load.norm(block.norm1, f"{prefix}.norm1")
    load.conv(block.conv1, f"{prefix}.conv1")
    load.norm(block.norm2, f"{prefix}.norm2")
    load.conv(block.conv2, f"{prefix}.conv2")
    if block.conv_shortcut is not None:
        load.conv(block.conv_shortcut, f"{prefix}.conv_shortcut")


def _mid_block(load, block, prefix):
    _resnet(load, block.resnet_0, f"{prefix}.resnets.0")
    attention, at = block.attention, f"{prefix}.attentions.0"
    load.norm(attention.group_norm, f"{at}.group_norm")
    load.linear(attention.to_q, f"{at}.to_q")
    load.linear(attention.to_k, f"{at}.to_k")
    load.linear(attention.to_v, f"{at}.to_v")
    load.linear(attention.to_out, f"{at}.to_out.0")
    _resnet(load, block.resnet_1, f"{prefix}.resnets.1")


def _levels(load, levels, samplers, prefix, sampler):
    """Each level's resnets, then its down/upsampling conv (if it has one)."""
    for i, level in enumerate(levels):
        for j, resnet in enumerate(level):
            _resnet(load, resnet, f"{prefix}.{i}.resnets.{j}")
        if i < len(samplers):
            load.conv(samplers[i].conv, f"{prefix}.{i}.{sampler}.0.conv")


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
    load = WeightLoader(source, vae)
    encoder, decoder = vae.encoder, vae.decoder

    load.conv(encoder.conv_in, "encoder.conv_in")
    down = "encoder.down_blocks"
    _levels(load, encoder.down_resnets, encoder.downsamplers, down, "downsamplers")
    _mid_block(load, encoder.mid_block, "encoder.mid_block")
    load.norm(encoder.norm_out, "encoder.conv_norm_out")
    load.conv(encoder.conv_out, "encoder.conv_out")
    if encoder.quant_conv is not None:
        load.conv(encoder.quant_conv, "quant_conv")

    if decoder.post_quant_conv is not None:
        load.conv(decoder.post_quant_conv, "post_quant_conv")
    load.conv(decoder.conv_in, "decoder.conv_in")
    _mid_block(load, decoder.mid_block, "decoder.mid_block")
    # diffusers numbers up_blocks in decoding order, widest level first,
    # which is also the order of `up_resnets`.
    up = "decoder.up_blocks"
    _levels(load, decoder.up_resnets, decoder.upsamplers, up, "upsamplers")
    load.norm(decoder.norm_out, "decoder.conv_norm_out")
    load.conv(decoder.conv_out, "decoder.conv_out")

    load.finish()
