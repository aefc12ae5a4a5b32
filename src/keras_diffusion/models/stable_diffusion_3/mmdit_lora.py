"""SD3's LoRA targets, and LoRA parameter counts computed from a config.

The default targets are the MMDiT's attention projections in both streams:
the fused q/k/v projection and the attention output of the image stream
(`x_qkv`, `x_attention_output`) and of the text stream (`context_qkv`,
`context_attention_output`; the last, context-pre-only block has no text
output projection). The MMDiT-X second attention (`x_qkv_2`,
`x_attention_output_2`) is not a default target, as in diffusers.

**Fused q/k/v and "q, k, v".** diffusers (PEFT) puts one adapter on each of
`to_q`, `to_k`, `to_v` (and `add_q/k/v_proj`): three rank-`r` updates
`A_q B_q`, `A_k B_k`, `A_v B_v`, `6 d r` parameters. Here one rank-`r`
adapter sits on the fused `(d, 3d)` kernel: `A (d, r) @ B (r, 3d)`, whose
column blocks `A B_q | A B_k | A B_v` are the q, k and v updates sharing one
down-projection `A`: `4 d r` parameters. A fused rank-`3r` adapter can
express any three separate rank-`r` ones (stack the `A`s, block-diagonal
`B`), so fused rank `r` is a subset of separate rank `r`, and fused rank
`3r` a superset.

Examples:

>>> config = {"hidden_dim": 1536, "num_layers": 24, "num_heads": 24,
...           "position_size": 192}
>>> lora_parameters({"mmdit": config}, rank=4)  # SD3-medium
1757184
"""

import fnmatch

from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.mmdit_blocks import TIMESTEP_CHANNELS
from keras_diffusion.models.stable_diffusion_3.parameter_count import _arguments

DEFAULT_LORA_TARGETS = (
    "mmdit/block_*/x_qkv",
    "mmdit/block_*/context_qkv",
    "mmdit/block_*/x_attention_output",
    "mmdit/block_*/context_attention_output",
)


def mmdit_dense_layers(config, prefix="mmdit/"):
    """`{path: (input_dim, units)}` of every `Dense` of `MMDiT(**config)`.

    Paths are those `keras_diffusion.models.lora.dense_layers` gives for a
    backbone (`prefix` "mmdit/") or for the MMDiT itself (`prefix` "").
    The AdaLN `Modulation` layers and the patch-embedding conv are not
    `Dense` layers and cannot carry an adapter.

    Examples:

    >>> layers = mmdit_dense_layers(
    ...     {"hidden_dim": 64, "num_layers": 3, "num_heads": 4,
    ...      "position_size": 16}
    ... )
    >>> layers["mmdit/block_0/x_qkv"], "mmdit/block_2/context_mlp/dense_1" in layers
    ((64, 192), False)
    """
    c = _arguments(MMDiT, config)
    d, inner = c["hidden_dim"], c["mlp_ratio"] * c["hidden_dim"]
    out = c["patch_size"] ** 2 * c["latent_channels"]
    layers = {
        "timestep_dense_1": (TIMESTEP_CHANNELS, d),
        "timestep_dense_2": (d, d),
        "pooled_dense_1": (c["pooled_dim"], d),
        "pooled_dense_2": (d, d),
        "context_embedding": (c["context_dim"], d),
        "output_projection": (d, out),
    }
    dual = {int(i) for i in c["dual_attention_layers"] or ()}
    for i in range(c["num_layers"]):
        streams = ["x"] if i == c["num_layers"] - 1 else ["x", "context"]
        for stream in streams:
            layers[f"block_{i}/{stream}_mlp/dense_1"] = (d, inner)
            layers[f"block_{i}/{stream}_mlp/dense_2"] = (inner, d)
            layers[f"block_{i}/{stream}_attention_output"] = (d, d)
        layers[f"block_{i}/x_qkv"] = (d, 3 * d)
        layers[f"block_{i}/context_qkv"] = (d, 3 * d)
        if i in dual:
            layers[f"block_{i}/x_qkv_2"] = (d, 3 * d)
            layers[f"block_{i}/x_attention_output_2"] = (d, d)
    return {prefix + path: shape for path, shape in layers.items()}


def lora_parameters(config, rank, target_layers=None):
    """Trainable LoRA parameters of a backbone config, without building it.

    Each adapted `Dense (in, out)` adds `rank * (in + out)` parameters. For
    SD3-medium (hidden 1536, 24 blocks, the last context-pre-only) and the
    default targets that is `286 * 1536 * rank = 439,296 * rank`.

    Args:
        config: a `StableDiffusion3Backbone` config (only `mmdit` is read).
        rank: int, the adapters' rank.
        target_layers: glob patterns as for `Backbone.enable_lora`; None
            means `DEFAULT_LORA_TARGETS`. Only MMDiT layers can be counted.

    Examples:

    >>> tiny = {"hidden_dim": 64, "num_layers": 3, "num_heads": 4,
    ...         "position_size": 16}
    >>> lora_parameters({"mmdit": tiny}, rank=4)
    8704
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive int; got {rank!r}.")
    layers = mmdit_dense_layers(config["mmdit"])
    patterns = DEFAULT_LORA_TARGETS if target_layers is None else target_layers
    if isinstance(patterns, str):
        patterns = [patterns]
    matched = set()
    for pattern in patterns:
        hits = [p for p in layers if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise ValueError(
                f"LoRA target {pattern!r} matches no MMDiT Dense layer (counts "
                "cover the MMDiT only; paths look like 'mmdit/block_0/x_qkv')."
            )
        matched.update(hits)
    return sum(rank * sum(layers[p]) for p in matched)
