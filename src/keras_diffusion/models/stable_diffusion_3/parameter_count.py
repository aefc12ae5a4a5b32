"""Analytic parameter counts of `StableDiffusion3Backbone` and its components.

Every function takes OUR constructor arguments (the dicts of a
`StableDiffusion3Backbone` config: `clip_l`, `clip_g`, `t5`, `mmdit`, `vae`;
omitted arguments take the constructor's defaults) and returns, without
building anything, exactly the number of scalars the built layer holds, i.e.
its `count_params()`, which counts every weight, trainable or not.

Two totals are worth telling apart:

- **Our weights** (`"total"`, and each component's count): everything a
  built backbone holds, including the MMDiT's non-trainable position table
  (diffusers' `pos_embed.pos_embed`, which the checkpoints ship).
- **`"diffusers_comparable"`**: what diffusers' `num_parameters()` and
  transformers' `num_parameters()` (both `sum(p.numel() for p in
  model.parameters())`) report for the same components. They count
  `nn.Parameter`s only, not buffers, so the position table is left out;
  everything else matches one to one (our fused q/k/v kernels hold exactly
  the separate projections, and T5's tied `shared` / `embed_tokens` table is
  one parameter on both sides).

Examples:

>>> clip_text_encoder_parameters({
...     "embedding_dim": 768, "num_layers": 12, "num_heads": 12,
...     "intermediate_dim": 3072, "intermediate_activation": "quick_gelu",
...     "projection_dim": 768,
... })
123650304
>>> counts = backbone_parameters({
...     "clip_l": {"embedding_dim": 8, "num_layers": 1, "num_heads": 2,
...                "intermediate_dim": 16, "intermediate_activation": "gelu",
...                "projection_dim": 8, "vocabulary_size": 10},
...     "clip_g": {"embedding_dim": 8, "num_layers": 1, "num_heads": 2,
...                "intermediate_dim": 16, "intermediate_activation": "gelu",
...                "projection_dim": 8, "vocabulary_size": 10},
...     "mmdit": {"hidden_dim": 16, "num_layers": 1, "num_heads": 2,
...               "position_size": 4, "context_dim": 16, "pooled_dim": 16},
...     "vae": {"block_channels": [8, 8], "norm_groups": 4},
...     "t5": None,
... })
>>> counts["total"] == sum(counts[k] for k in ("clip_l", "clip_g", "mmdit", "vae"))
True
>>> counts["total"] - counts["diffusers_comparable"] == 4 * 4 * 16
True
"""

import inspect

from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import CLIPTextEncoder
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.mmdit_blocks import TIMESTEP_CHANNELS
from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
from keras_diffusion.models.stable_diffusion_3.vae import VAE

IMAGE_CHANNELS = 3  # the VAE encodes and decodes RGB


def _arguments(cls, config):
    """`config` completed with `cls.__init__`'s defaults; unknown keys fail."""
    parameters = inspect.signature(cls.__init__).parameters
    known = {n for n in parameters if n not in ("self", "kwargs")}
    unknown = sorted(set(config) - known - {"name", "dtype", "trainable"})
    if unknown:
        raise ValueError(f"{cls.__name__} takes no argument(s) {unknown}.")
    arguments = {
        n: p.default
        for n, p in parameters.items()
        if n in known and p.default is not inspect.Parameter.empty
    }
    arguments.update(config)
    missing = sorted(known - set(arguments))
    if missing:
        raise ValueError(f"{cls.__name__} config lacks required {missing}.")
    return arguments


def _dense(fan_in, units, bias=True):
    return fan_in * units + (units if bias else 0)


def _conv(kernel, fan_in, filters):
    return kernel * kernel * fan_in * filters + filters


def clip_text_encoder_parameters(config):
    """Weights of a `CLIPTextEncoder(**config)` (CLIP-L or CLIP-G).

    Token and position tables, per block two layer norms (scale and bias),
    the fused q/k/v, the attention output and the two MLP denses (all with
    biases), then the final layer norm and the bias-free text projection.

    Examples:

    >>> clip_text_encoder_parameters({
    ...     "embedding_dim": 1280, "num_layers": 32, "num_heads": 20,
    ...     "intermediate_dim": 5120, "intermediate_activation": "gelu",
    ...     "projection_dim": 1280,
    ... })
    694659840
    """
    c = _arguments(CLIPTextEncoder, config)
    d, inner = c["embedding_dim"], c["intermediate_dim"]
    block = (
        2 * 2 * d
        + _dense(d, 3 * d)
        + _dense(d, d)
        + _dense(d, inner)
        + _dense(inner, d)
    )
    return (
        (c["vocabulary_size"] + c["max_sequence_length"]) * d
        + c["num_layers"] * block
        + 2 * d
        + _dense(d, c["projection_dim"], bias=False)
    )


def t5_encoder_parameters(config):
    """Weights of a `T5Encoder(**config)` (T5 v1.1, gated-GELU).

    The token table, one relative-attention bias table (buckets x heads,
    owned by the first block in transformers), per block two RMS-norm
    scales and the bias-free q/k/v/o and wi_0/wi_1/wo projections, and the
    final RMS-norm scale.

    Examples:

    >>> t5_encoder_parameters({
    ...     "vocabulary_size": 32128, "hidden_dim": 4096, "num_layers": 24,
    ...     "num_heads": 64, "key_value_dim": 64, "intermediate_dim": 10240,
    ... })
    4762310656
    """
    c = _arguments(T5Encoder, config)
    d, ff = c["hidden_dim"], c["intermediate_dim"]
    inner = c["num_heads"] * c["key_value_dim"]
    block = 2 * d + 4 * d * inner + 3 * d * ff
    return (
        c["vocabulary_size"] * d
        + c["relative_attention_num_buckets"] * c["num_heads"]
        + c["num_layers"] * block
        + d
    )


def mmdit_position_table_parameters(config):
    """Size of the MMDiT's non-trainable position table, `size² x hidden`.

    It is diffusers' `pos_embed.pos_embed` buffer, which diffusers does not
    count as a parameter.

    Examples:

    >>> mmdit_position_table_parameters(
    ...     {"hidden_dim": 1536, "num_layers": 24, "num_heads": 24,
    ...      "position_size": 192}
    ... )
    56623104
    """
    c = _arguments(MMDiT, config)
    return c["position_size"] ** 2 * c["hidden_dim"]


def mmdit_parameters(config, include_position_table=True):
    """Weights of an `MMDiT(**config)`.

    Args:
        config: dict of `MMDiT` arguments.
        include_position_table: bool. True (the default) counts the
            non-trainable position table, as `count_params()` does; False
            gives diffusers' `SD3Transformer2DModel.num_parameters()`.

    Examples:

    >>> config = {
    ...     "hidden_dim": 1536, "num_layers": 24, "num_heads": 24,
    ...     "position_size": 192,
    ... }
    >>> mmdit_parameters(config)
    2084951104
    >>> mmdit_parameters(config, include_position_table=False)
    2028328000
    """
    c = _arguments(MMDiT, config)
    d, layers, p = c["hidden_dim"], c["num_layers"], c["patch_size"]
    mlp = _dense(d, c["mlp_ratio"] * d) + _dense(c["mlp_ratio"] * d, d)
    head_dim = d // c["num_heads"]
    qk_norm = 0 if c["qk_norm"] is None else head_dim
    dual = sorted({int(i) for i in c["dual_attention_layers"] or ()})
    # Every block: image AdaLN-Zero (6 chunks), image and text q/k/v, four
    # q/k norms, the image attention output and MLP.
    shared = 2 * _dense(d, 3 * d) + 4 * qk_norm + _dense(d, d) + mlp
    # All but the last: text AdaLN-Zero (6 chunks), attention output, MLP.
    full = shared + _dense(d, 6 * d) + _dense(d, 6 * d) + _dense(d, d) + mlp
    # The last, context-pre-only block: a 2-chunk text modulation.
    pre_only = shared + _dense(d, 6 * d) + _dense(d, 2 * d)
    # MMDiT-X: 3 more image modulation chunks and a second attention.
    dual_extra = 3 * _dense(d, d) + _dense(d, 3 * d) + 2 * qk_norm + _dense(d, d)
    out = p * p * c["latent_channels"]
    total = (
        _conv(p, c["latent_channels"], d)
        + _dense(TIMESTEP_CHANNELS, d)
        + _dense(d, d)
        + _dense(c["pooled_dim"], d)
        + _dense(d, d)
        + _dense(c["context_dim"], d)
        + (layers - 1) * full
        + pre_only
        + len(dual) * dual_extra
        + _dense(d, 2 * d)
        + _dense(d, out)
    )
    if include_position_table:
        total += mmdit_position_table_parameters(config)
    return total


def _resnet(fan_in, out):
    shortcut = _conv(1, fan_in, out) if fan_in != out else 0
    return 2 * fan_in + _conv(3, fan_in, out) + 2 * out + _conv(3, out, out) + shortcut


def _mid_block(channels):
    attention = 2 * channels + 4 * _dense(channels, channels)
    return 2 * _resnet(channels, channels) + attention


def vae_parameters(config):
    """Weights of a `VAE(**config)`: encoder and decoder.

    Group norms hold a scale and a bias per channel; every conv and dense
    has a bias.

    Examples:

    >>> vae_parameters({"block_channels": [128, 256, 512, 512]})
    83819683
    """
    c = _arguments(VAE, config)
    channels = tuple(c["block_channels"])
    latent = c["latent_channels"]

    def levels(widths, fan_in, per_block):
        total = 0
        for i, out in enumerate(widths):
            for _ in range(per_block):
                total += _resnet(fan_in, out)
                fan_in = out
            if i < len(widths) - 1:
                total += _conv(3, out, out)  # down- or upsampling conv
        return total

    last = channels[-1]
    encoder = (
        _conv(3, IMAGE_CHANNELS, channels[0])
        + levels(channels, channels[0], c["encoder_layers_per_block"])
        + _mid_block(last)
        + 2 * last
        + _conv(3, last, 2 * latent)
        + (_conv(1, 2 * latent, 2 * latent) if c["use_quant_conv"] else 0)
    )
    decoder = (
        (_conv(1, latent, latent) if c["use_post_quant_conv"] else 0)
        + _conv(3, latent, last)
        + _mid_block(last)
        + levels(channels[::-1], last, c["decoder_layers_per_block"])
        + 2 * channels[0]
        + _conv(3, channels[0], IMAGE_CHANNELS)
    )
    return encoder + decoder


def backbone_parameters(config):
    """Parameter counts of a `StableDiffusion3Backbone(**config)`.

    Args:
        config: the backbone's config dict (`clip_l`, `clip_g`, `mmdit`,
            `vae` and optionally `t5`; other keys are ignored).

    Returns:
        A dict of ints:
        - `"clip_l"`, `"clip_g"`, `"mmdit"`, `"vae"` and, when the config
          has a T5, `"t5"`: each component's weights (`count_params()`).
        - `"mmdit_position_table"`: the non-trainable part of `"mmdit"`.
        - `"total"`: all weights, `backbone.count_params()`.
        - `"total_without_t5"`: the same without the T5 encoder.
        - `"diffusers_comparable"`: `"total"` less the position table, the
          sum of diffusers' and transformers' `num_parameters()` for the
          pipeline's components.
        - `"diffusers_comparable_without_t5"`: the same without T5.

    Examples:

    >>> import json, os
    >>> from keras_diffusion.presets.catalogue import BUILTIN_DIR
    >>> path = os.path.join(BUILTIN_DIR, "sd3_tiny_demo", "config.json")
    >>> with open(path) as f:
    ...     config = json.load(f)["config"]
    >>> counts = backbone_parameters(config)
    >>> counts["total"], counts["diffusers_comparable"]
    (1614195, 1589619)
    """
    counts = {
        "clip_l": clip_text_encoder_parameters(config["clip_l"]),
        "clip_g": clip_text_encoder_parameters(config["clip_g"]),
    }
    t5 = config.get("t5")
    if t5 is not None:
        counts["t5"] = t5_encoder_parameters(t5)
    counts["mmdit"] = mmdit_parameters(config["mmdit"])
    counts["vae"] = vae_parameters(config["vae"])
    position_table = mmdit_position_table_parameters(config["mmdit"])
    total = sum(counts.values())
    without_t5 = total - counts.get("t5", 0)
    counts.update(
        {
            "mmdit_position_table": position_table,
            "total": total,
            "total_without_t5": without_t5,
            "diffusers_comparable": total - position_table,
            "diffusers_comparable_without_t5": without_t5 - position_table,
        }
    )
    return counts
