"""Infer SD3 / SD3.5 component configs from a single file's tensor shapes.

Stability's single-file checkpoints carry no config. Each function here
takes a `TensorSource` (or view) of one component, under the names that
component has in the checkpoint, and returns our constructor arguments:

- `mmdit_kwargs` (reference names, `model.diffusion_model.` removed): width
  and patch size from `x_embedder`, the position-table size from
  `pos_embed`, depth from `joint_blocks.{i}`, RMS q/k norm from `ln_q`,
  MMDiT-X dual attention from `attn2`, the MLP ratio from `fc1`; heads are
  `width / head_width`, the head width read from the q/k norm when there is
  one, else 64 (the reference's `hidden = 64 * depth`, `heads = depth`);
- `vae_kwargs` (LDM names, `first_stage_model.` removed): level widths and
  block counts; group norms of 32 and SD3's latent scale 1.5305 and shift
  0.0609, which shapes cannot tell;
- `clip_kwargs` (transformers names): width, depth, MLP width, vocabulary,
  sequence length, projection (the width when absent); 64-wide heads;
- `t5_kwargs` (transformers names): all from the weights, including heads
  (from the relative attention bias) and the key/value width.

Each raises `KeyError` naming a tensor it needs and cannot find.

Examples:

>>> import numpy as np
>>> from keras_diffusion.converters.safetensors_reader import TensorSource
>>> shapes = {
...     "text_model.embeddings.token_embedding.weight": (49408, 768),
...     "text_model.embeddings.position_embedding.weight": (77, 768),
...     "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
... }
>>> source = TensorSource.from_dict({k: np.empty(s) for k, s in shapes.items()})
>>> kwargs = clip_kwargs(source, "quick_gelu")
>>> kwargs["num_heads"], kwargs["projection_dim"], kwargs["end_token_id"]
(12, 768, 49407)
"""

import math
import re

from keras_diffusion.converters import stability_keys

HEAD_DIM = 64
SCALING_FACTOR, SHIFT_FACTOR, NORM_GROUPS = 1.5305, 0.0609, 32


def _count(source, pattern):
    found = {int(m.group(1)) for k in source.keys() if (m := re.match(pattern, k))}
    if found and found != set(range(max(found) + 1)):
        raise ValueError(f"Non-contiguous layer numbers for {pattern!r}: {found}.")
    return len(found)


def _need(source, name, what):
    if name not in source:
        raise KeyError(f"Tensor {name!r} ({what}) is missing from the checkpoint.")
    return source.shape(name)


def mmdit_kwargs(source):
    """`MMDiT` arguments from the shapes of a reference-named MMDiT."""
    hidden, channels, patch, _ = _need(source, "x_embedder.proj.weight", "patches")
    _, positions, _ = _need(source, "pos_embed", "position table")
    size = math.isqrt(positions)
    if size * size != positions:
        raise ValueError(f"pos_embed has {positions} positions, not a square.")
    layers = _count(source, r"^joint_blocks\.(\d+)\.")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in source
    head_dim = (
        source.shape("joint_blocks.0.x_block.attn.ln_q.weight")[0]
        if qk_norm
        else HEAD_DIM
    )
    if not layers or hidden % head_dim:
        raise ValueError(
            f"Cannot infer the MMDiT's heads: {layers} blocks of width {hidden} "
            f"(head width {head_dim})."
        )
    fc1 = _need(source, "joint_blocks.0.x_block.mlp.fc1.weight", "MLP")[0]
    dual = [
        i
        for i in range(layers)
        if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in source
    ]
    return {
        "hidden_dim": int(hidden),
        "num_layers": layers,
        "num_heads": int(hidden // head_dim),
        "position_size": size,
        "patch_size": int(patch),
        "latent_channels": int(channels),
        "context_dim": int(_need(source, "context_embedder.weight", "context")[1]),
        "pooled_dim": int(_need(source, "y_embedder.mlp.0.weight", "pooled")[1]),
        "qk_norm": "rms_norm" if qk_norm else None,
        "dual_attention_layers": tuple(dual),
        "mlp_ratio": int(fc1 // hidden),
    }


def vae_kwargs(source):
    """`VAE` arguments from the shapes of an LDM-named VAE."""
    levels = stability_keys.vae_levels(source)
    if not levels:
        raise KeyError("The checkpoint has no VAE encoder levels (encoder.down.*).")
    widths = [
        int(_need(source, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0])
        for i in range(levels)
    ]
    return {
        "block_channels": tuple(widths),
        "encoder_layers_per_block": _count(
            source, r"^encoder\.down\.0\.block\.(\d+)\."
        ),
        "decoder_layers_per_block": _count(source, r"^decoder\.up\.0\.block\.(\d+)\."),
        "latent_channels": int(_need(source, "decoder.conv_in.weight", "VAE")[1]),
        "norm_groups": NORM_GROUPS,
        "scaling_factor": SCALING_FACTOR,
        "shift_factor": SHIFT_FACTOR,
        "use_quant_conv": "quant_conv.weight" in source,
        "use_post_quant_conv": "post_quant_conv.weight" in source,
    }


def clip_kwargs(source, activation):
    """`CLIPTextEncoder` arguments from a transformers-named CLIP text model."""
    embeddings = "text_model.embeddings"
    vocabulary, width = _need(source, f"{embeddings}.token_embedding.weight", "CLIP")
    length = _need(source, f"{embeddings}.position_embedding.weight", "CLIP")[0]
    if width % HEAD_DIM:
        raise ValueError(f"CLIP width {width} is not a multiple of {HEAD_DIM}.")
    projection = width
    if "text_projection.weight" in source:
        projection = source.shape("text_projection.weight")[0]
    fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
    return {
        "embedding_dim": int(width),
        "num_layers": _count(source, r"^text_model\.encoder\.layers\.(\d+)\."),
        "num_heads": int(width // HEAD_DIM),
        "intermediate_dim": int(_need(source, fc1, "CLIP")[0]),
        "intermediate_activation": activation,
        "projection_dim": int(projection),
        "vocabulary_size": int(vocabulary),
        "max_sequence_length": int(length),
        "end_token_id": int(vocabulary) - 1,
        "layer_norm_epsilon": 1e-5,
    }


def t5_kwargs(source):
    """`T5Encoder` arguments from a transformers-named T5 encoder."""
    attention = "encoder.block.0.layer.0.SelfAttention"
    buckets, heads = _need(source, f"{attention}.relative_attention_bias.weight", "T5")
    inner, width = _need(source, f"{attention}.q.weight", "T5")
    embedding = "shared.weight"
    if embedding not in source:
        embedding = "encoder.embed_tokens.weight"
    return {
        "vocabulary_size": int(_need(source, embedding, "T5")[0]),
        "hidden_dim": int(width),
        "num_layers": _count(source, r"^encoder\.block\.(\d+)\."),
        "num_heads": int(heads),
        "key_value_dim": int(inner // heads),
        "intermediate_dim": int(
            _need(source, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5")[0]
        ),
        "relative_attention_num_buckets": int(buckets),
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
    }
