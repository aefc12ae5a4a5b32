"""Convert transformers text encoders (CLIP, T5) into keras-diffusion layers.

Each model has a `*_kwargs(hf_config)` function, mapping a transformers
`config.json` (as a dict) to constructor arguments, and a `load_*` function
that copies the weights of a `TensorSource` into a layer. Loading fails
loudly: a missing tensor raises `KeyError`, a tensor of the wrong shape, a
checkpoint tensor left unused, or a layer variable left unassigned raise
`ValueError`, each naming the tensor or variable.

Examples:

>>> import keras
>>> import numpy as np
>>> from keras_diffusion.converters.safetensors_reader import TensorSource
>>> from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
>>> config = {"vocab_size": 10, "d_model": 4, "num_layers": 1, "num_heads": 1,
...           "d_kv": 4, "d_ff": 6, "feed_forward_proj": "gated-gelu"}
>>> encoder = T5Encoder(**t5_encoder_kwargs(config))
>>> block = "encoder.block.0.layer."
>>> shapes = {
...     "shared.weight": (10, 4),
...     block + "0.SelfAttention.q.weight": (4, 4),
...     block + "0.SelfAttention.k.weight": (4, 4),
...     block + "0.SelfAttention.v.weight": (4, 4),
...     block + "0.SelfAttention.o.weight": (4, 4),
...     block + "0.SelfAttention.relative_attention_bias.weight": (32, 1),
...     block + "0.layer_norm.weight": (4,),
...     block + "1.DenseReluDense.wi_0.weight": (6, 4),
...     block + "1.DenseReluDense.wi_1.weight": (6, 4),
...     block + "1.DenseReluDense.wo.weight": (4, 6),
...     block + "1.layer_norm.weight": (4,),
...     "encoder.final_layer_norm.weight": (4,),
... }
>>> source = TensorSource.from_dict({k: np.full(s, 0.5) for k, s in shapes.items()})
>>> load_t5_encoder(encoder, source)
>>> float(keras.ops.convert_to_numpy(encoder.final_norm.scale)[0])
0.5
>>> del shapes["encoder.final_layer_norm.weight"]
>>> source = TensorSource.from_dict({k: np.ones(s) for k, s in shapes.items()})
>>> load_t5_encoder(encoder, source)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
KeyError: "Tensor 'encoder.final_layer_norm.weight' is missing from the checkpoint..."
"""

from keras_diffusion.converters.weight_loader import WeightLoader

# Non-persistent buffers that older transformers versions saved.
_CLIP_BUFFERS = ("text_model.embeddings.position_ids",)


def clip_text_encoder_kwargs(hf_config):
    """`CLIPTextEncoder` arguments from a `CLIPTextModelWithProjection` config.

    Configs written before transformers PR #24773 carry `eos_token_id=2`
    and pool with argmax(ids); that is the position of the largest id, the
    end token `vocab_size - 1`, which is what `end_token_id` is set to.
    """
    vocabulary_size = hf_config.get("vocab_size", 49408)
    eos_token_id = hf_config.get("eos_token_id", 2)
    if eos_token_id == 2:
        eos_token_id = vocabulary_size - 1
    return {
        "embedding_dim": hf_config["hidden_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_heads": hf_config["num_attention_heads"],
        "intermediate_dim": hf_config["intermediate_size"],
        "intermediate_activation": hf_config.get("hidden_act", "quick_gelu"),
        "projection_dim": hf_config["projection_dim"],
        "vocabulary_size": vocabulary_size,
        "max_sequence_length": hf_config.get("max_position_embeddings", 77),
        "end_token_id": eos_token_id,
        "layer_norm_epsilon": hf_config.get("layer_norm_eps", 1e-5),
    }


def load_clip_text_encoder(encoder, source):
    """Copy `CLIPTextModelWithProjection` weights from `source` into `encoder`.

    Args:
        encoder: a `CLIPTextEncoder`; built here if it is not yet.
        source: a `TensorSource` with transformers' tensor names
            (`text_model.…`, `text_projection.weight`); use
            `source.scoped(prefix)` for a prefixed checkpoint.
    """
    if not encoder.built:
        encoder.build((None, encoder.max_sequence_length))
    load = WeightLoader(source, encoder, ignore=_CLIP_BUFFERS)
    embeddings = "text_model.embeddings"
    load.copy(
        encoder.token_embedding.embeddings, f"{embeddings}.token_embedding.weight"
    )
    load.copy(
        encoder.position_embedding.embeddings, f"{embeddings}.position_embedding.weight"
    )
    for i, layer in enumerate(encoder.encoder_layers):
        prefix = f"text_model.encoder.layers.{i}"
        attention = f"{prefix}.self_attn"
        load.norm(layer.layer_norm_1, f"{prefix}.layer_norm1")
        load.linear(layer.qkv, *(f"{attention}.{p}_proj" for p in "qkv"))
        load.linear(layer.attention_output, f"{attention}.out_proj")
        load.norm(layer.layer_norm_2, f"{prefix}.layer_norm2")
        load.linear(layer.fc1, f"{prefix}.mlp.fc1")
        load.linear(layer.fc2, f"{prefix}.mlp.fc2")
    load.norm(encoder.final_layer_norm, "text_model.final_layer_norm")
    load.linear(encoder.text_projection, "text_projection", bias=False)
    load.finish()


def t5_encoder_kwargs(hf_config):
    """`T5Encoder` arguments from a transformers `T5EncoderModel` config.

    Only T5 v1.1's gated-GELU feed-forward is supported.
    """
    projection = hf_config.get("feed_forward_proj", "relu")
    if projection not in ("gated-gelu", "gated-gelu_new"):
        raise ValueError(
            f"Only T5 v1.1 (feed_forward_proj='gated-gelu') is supported, got "
            f"feed_forward_proj={projection!r}."
        )
    return {
        "vocabulary_size": hf_config["vocab_size"],
        "hidden_dim": hf_config["d_model"],
        "num_layers": hf_config["num_layers"],
        "num_heads": hf_config["num_heads"],
        "key_value_dim": hf_config["d_kv"],
        "intermediate_dim": hf_config["d_ff"],
        "relative_attention_num_buckets": hf_config.get(
            "relative_attention_num_buckets", 32
        ),
        "relative_attention_max_distance": hf_config.get(
            "relative_attention_max_distance", 128
        ),
        "layer_norm_epsilon": hf_config.get("layer_norm_epsilon", 1e-6),
    }


def load_t5_encoder(encoder, source):
    """Copy `T5EncoderModel` weights from `source` into `encoder`.

    The token embedding is read from `encoder.embed_tokens.weight` when the
    checkpoint has it, else from the tied `shared.weight`; both are
    consumed.

    Args:
        encoder: a `T5Encoder`; built here if it is not yet.
        source: a `TensorSource` with transformers' tensor names.
    """
    if not encoder.built:
        encoder.build((None, None))
    load = WeightLoader(source, encoder)
    embedding = encoder.token_embedding.embeddings
    names = [n for n in ("encoder.embed_tokens.weight", "shared.weight") if n in source]
    if not names:
        names = ["shared.weight"]  # `copy` raises, naming it
    for name in names[1:]:
        load.check(name, embedding.shape)  # tied copy: shape-checked, not read
    load.copy(embedding, names[0])

    for i, layer in enumerate(encoder.encoder_layers):
        attention = f"encoder.block.{i}.layer.0"
        ffn = f"encoder.block.{i}.layer.1"
        load.norm(layer.attention_norm, f"{attention}.layer_norm")
        qkv = (f"{attention}.SelfAttention.{p}" for p in "qkv")
        load.linear(layer.qkv, *qkv, bias=False)
        load.linear(layer.attention_output, f"{attention}.SelfAttention.o", bias=False)
        if i == 0:
            load.copy(
                encoder.relative_attention_bias.embeddings,
                f"{attention}.SelfAttention.relative_attention_bias.weight",
            )
        load.norm(layer.ffn_norm, f"{ffn}.layer_norm")
        dense = f"{ffn}.DenseReluDense"
        load.linear(layer.ffn_gate_up, f"{dense}.wi_0", f"{dense}.wi_1", bias=False)
        load.linear(layer.ffn_output, f"{dense}.wo", bias=False)
    load.norm(encoder.final_norm, "encoder.final_layer_norm")
    load.finish()
