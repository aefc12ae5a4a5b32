"""T5 v1.1 encoder (T5-XXL in Stable Diffusion 3).

Numerically matches transformers' `T5EncoderModel` with
`feed_forward_proj="gated-gelu"`: pre-RMSNorm blocks, unscaled attention
with a bucketed relative position bias that block 0 owns and every block
reuses, and a gated tanh-GELU feed-forward.

Half precision: T5's activations outgrow float16 in the feed-forward
output. transformers keeps `wo` in float32, which makes its residual stream
float32 after the first block. Here the residual stream, the gated product,
the `wo` projection and the attention itself (T5's logits are unscaled and
large) are float32 from the start, whatever the dtype policy; the q/k/v,
attention-output and `wi` projections run in the compute dtype.
"""

import math

import keras
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.utils.fast_ops import linear
from keras_diffusion.utils.shared_traces import layer_caller


def relative_position_buckets(
    query_length, key_length, num_buckets=32, max_distance=128
):
    """Bidirectional T5 bucket of `key_position - query_position`.

    Returns an int32 `(query_length, key_length)` tensor in
    `[0, num_buckets)`: half of the buckets for each sign, the first half of
    those for exact small distances, the rest log-spaced up to
    `max_distance` and saturating beyond it. The float32 arithmetic follows
    the reference order so that boundary cases truncate identically.

    Examples:

    >>> buckets = relative_position_buckets(3, 3)
    >>> [[int(b) for b in row] for row in buckets]
    [[0, 17, 18], [1, 0, 17], [2, 1, 0]]
    """
    context = ops.arange(query_length, dtype="int32")[:, None]
    memory = ops.arange(key_length, dtype="int32")[None, :]
    relative = memory - context
    half = num_buckets // 2
    buckets = ops.cast(relative > 0, "int32") * half
    distance = ops.abs(relative)
    max_exact = half // 2
    # Clamp at 1 before the log: the small-distance branch is used for 0.
    ratio = ops.cast(ops.maximum(distance, 1), "float32") / float(max_exact)
    log_ratio = ops.log(ratio) / math.log(max_distance / max_exact)
    large = max_exact + ops.cast(log_ratio * (half - max_exact), "int32")
    large = ops.minimum(large, half - 1)
    return buckets + ops.where(distance < max_exact, distance, large)


@register
class T5EncoderBlock(keras.layers.Layer):
    """One T5 v1.1 encoder block: RMSNorm, attention, RMSNorm, gated FFN.

    `call(x, position_bias)` takes the float32 residual stream `x` of shape
    `(batch, length, hidden_dim)` and an additive attention bias of shape
    `(1, num_heads, length, length)`; it returns the float32 residual
    stream. Its inputs are deliberately not cast to the compute dtype.

    Args:
        hidden_dim: int. Model width (`d_model`).
        num_heads: int. Attention heads.
        key_value_dim: int. Width of each head (`d_kv`).
        intermediate_dim: int. Feed-forward width (`d_ff`).
        layer_norm_epsilon: float. RMSNorm epsilon.

    Examples:

    >>> block = T5EncoderBlock(32, 4, 8, 37)
    >>> x = keras.ops.zeros((2, 160, 32))
    >>> tuple(block(x, keras.ops.zeros((1, 4, 160, 160))).shape)
    (2, 160, 32)
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        key_value_dim,
        intermediate_dim,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Keep the float32 residual stream float32 on entry: Keras would
        # otherwise cast the inputs to the compute dtype (float16 overflows).
        self._convert_input_args = False
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.key_value_dim = key_value_dim
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        inner_dim = num_heads * key_value_dim

        def norm(name):
            return keras.layers.RMSNormalization(
                epsilon=layer_norm_epsilon, dtype="float32", name=name
            )

        def dense(units, name, dtype=None):
            return keras.layers.Dense(
                units, use_bias=False, dtype=dtype or self.dtype_policy, name=name
            )

        self.attention_norm = norm("attention_norm")
        # Fused projections; the converter concatenates q|k|v and wi_0|wi_1.
        self.qkv = dense(3 * inner_dim, "qkv")
        self.attention_output = dense(hidden_dim, "attention_output")
        self.ffn_norm = norm("ffn_norm")
        self.ffn_gate_up = dense(2 * intermediate_dim, "ffn_gate_up")
        self.ffn_output = dense(hidden_dim, "ffn_output", dtype="float32")

    def build(self, x_shape, position_bias_shape=None):
        inner_shape = tuple(x_shape[:-1]) + (self.num_heads * self.key_value_dim,)
        self.attention_norm.build(x_shape)
        self.qkv.build(x_shape)
        self.attention_output.build(inner_shape)
        self.ffn_norm.build(x_shape)
        self.ffn_gate_up.build(x_shape)
        self.ffn_output.build(tuple(x_shape[:-1]) + (self.intermediate_dim,))

    def call(self, x, position_bias):
        x = ops.cast(x, "float32")
        h = self.attention_norm(x)
        q, k, v = ops.split(linear(self.qkv, h), 3, axis=-1)
        heads_shape = tuple(ops.shape(x)[:-1]) + (self.num_heads, self.key_value_dim)
        # T5 does not scale its logits, which grow large: bfloat16 logits (the
        # TensorFlow backend rounds them) lose too much, so attention runs in
        # float32. It is a small part of T5's cost next to the feed-forward.
        q, k, v = (ops.cast(ops.reshape(t, heads_shape), "float32") for t in (q, k, v))
        attention = ops.dot_product_attention(
            q, k, v, bias=ops.cast(position_bias, "float32"), scale=1.0
        )
        attention = ops.reshape(
            attention, tuple(ops.shape(x)[:-1]) + (self.num_heads * self.key_value_dim,)
        )
        x = x + ops.cast(linear(self.attention_output, attention), "float32")

        gate, up = ops.split(linear(self.ffn_gate_up, self.ffn_norm(x)), 2, axis=-1)
        gate = keras.activations.gelu(ops.cast(gate, "float32"), approximate=True)
        h = gate * ops.cast(up, "float32")
        return x + linear(self.ffn_output, h)

    def compute_output_spec(self, x, position_bias):
        return keras.KerasTensor(x.shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "key_value_dim": self.key_value_dim,
                "intermediate_dim": self.intermediate_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


@register
class T5Encoder(keras.layers.Layer):
    """T5 v1.1 encoder stack: `call(token_ids)` returns the last hidden state.

    Takes int ids of shape `(batch, length)` and returns the final-RMSNormed
    hidden state `(batch, length, hidden_dim)` in the compute dtype. There
    is no padding mask (SD3 passes none).

    Args:
        vocabulary_size: int. Token vocabulary size.
        hidden_dim: int. Model width (`d_model`, 4096 for T5-XXL).
        num_layers: int. Number of blocks.
        num_heads: int. Attention heads.
        key_value_dim: int. Width of each head (`d_kv`).
        intermediate_dim: int. Feed-forward width (`d_ff`).
        relative_attention_num_buckets: int. Relative position buckets.
        relative_attention_max_distance: int. Distance where buckets saturate.
        layer_norm_epsilon: float. RMSNorm epsilon.

    Examples:

    >>> import numpy as np
    >>> encoder = T5Encoder(
    ...     vocabulary_size=1000, hidden_dim=32, num_layers=2, num_heads=4,
    ...     key_value_dim=8, intermediate_dim=37,
    ... )
    >>> token_ids = np.zeros((2, 160), "int32")  # 0 is T5's padding id
    >>> token_ids[:, :4] = [71, 812, 558, 1]  # ..., end of sequence (1)
    >>> tuple(encoder(token_ids).shape)
    (2, 160, 32)
    """

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        num_layers,
        num_heads,
        key_value_dim,
        intermediate_dim,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.key_value_dim = key_value_dim
        self.intermediate_dim = intermediate_dim
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.layer_norm_epsilon = layer_norm_epsilon

        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, dtype=self.dtype_policy, name="token_embedding"
        )
        self.relative_attention_bias = keras.layers.Embedding(
            relative_attention_num_buckets,
            num_heads,
            dtype=self.dtype_policy,
            name="relative_attention_bias",
        )
        self.encoder_layers = [
            T5EncoderBlock(
                hidden_dim,
                num_heads,
                key_value_dim,
                intermediate_dim,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=self.dtype_policy,
                name=f"encoder_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = keras.layers.RMSNormalization(
            epsilon=layer_norm_epsilon, dtype="float32", name="final_norm"
        )

    def build(self, input_shape):
        hidden_shape = tuple(input_shape) + (self.hidden_dim,)
        self.token_embedding.build(input_shape)
        self.relative_attention_bias.build((None, None))
        for layer in self.encoder_layers:
            layer.build(hidden_shape)
        self.final_norm.build(hidden_shape)

    def call(self, token_ids):
        token_ids = ops.cast(token_ids, "int32")
        length = ops.shape(token_ids)[1]
        x = ops.cast(self.token_embedding(token_ids), "float32")
        buckets = relative_position_buckets(
            length,
            length,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
        )
        # (length, length, heads) -> (1, heads, length, length), shared by
        # all blocks.
        position_bias = self.relative_attention_bias(buckets)
        position_bias = ops.expand_dims(ops.transpose(position_bias, (2, 0, 1)), 0)
        call = layer_caller(layers=self.encoder_layers)  # alike share a trace
        for layer in self.encoder_layers:
            x = call(layer, x, position_bias)
        return ops.cast(self.final_norm(x), self.compute_dtype)

    def compute_output_spec(self, token_ids):
        return keras.KerasTensor(
            tuple(token_ids.shape) + (self.hidden_dim,), dtype=self.compute_dtype
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "key_value_dim": self.key_value_dim,
                "intermediate_dim": self.intermediate_dim,
                "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": (
                    self.relative_attention_max_distance
                ),
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config
