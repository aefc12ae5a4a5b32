"""CLIP text encoder (CLIP-L / OpenCLIP-G) as used by Stable Diffusion 3.

Numerically matches transformers' `CLIPTextModelWithProjection`: a causal
pre-LayerNorm transformer over token + learned position embeddings. SD3
reads the penultimate hidden state (before the final layer norm) and the
projected, final-layer-normed state at the first end-of-text token.
"""

import keras
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.utils.fast_attention import joint_attention, split_heads
from keras_diffusion.utils.fast_elementwise import layer_normalization
from keras_diffusion.utils.fast_ops import linear
from keras_diffusion.utils.shared_traces import layer_caller


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU: `x * sigmoid(1.702 x)`."""
    return x * ops.sigmoid(1.702 * x)


def _exact_gelu(x):
    return keras.activations.gelu(x, approximate=False)


def _tanh_gelu(x):
    return keras.activations.gelu(x, approximate=True)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": _exact_gelu, "gelu_new": _tanh_gelu}


@register
class CLIPEncoderLayer(keras.layers.Layer):
    """One pre-LayerNorm CLIP block: causal self-attention, then an MLP.

    Args:
        embedding_dim: int. Width of the residual stream.
        num_heads: int. Attention heads; must divide `embedding_dim`.
        intermediate_dim: int. Hidden width of the MLP.
        intermediate_activation: str. `"quick_gelu"`, `"gelu"` or
            `"gelu_new"` (tanh approximation).
        layer_norm_epsilon: float. Epsilon of both layer norms.

    Examples:

    >>> import numpy as np
    >>> layer = CLIPEncoderLayer(32, 4, 37, "quick_gelu")
    >>> tuple(layer(np.zeros((2, 77, 32), "float32")).shape)
    (2, 77, 32)
    """

    def __init__(
        self,
        embedding_dim,
        num_heads,
        intermediate_dim,
        intermediate_activation,
        layer_norm_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if embedding_dim % num_heads:
            raise ValueError(
                f"embedding_dim={embedding_dim} is not divisible by "
                f"num_heads={num_heads}."
            )
        if intermediate_activation not in _ACTIVATIONS:
            raise ValueError(
                f"Unknown intermediate_activation {intermediate_activation!r}; "
                f"expected one of {sorted(_ACTIVATIONS)}."
            )
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.intermediate_activation = intermediate_activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self._activation = _ACTIVATIONS[intermediate_activation]

        def norm(name):
            return keras.layers.LayerNormalization(
                epsilon=layer_norm_epsilon, dtype="float32", name=name
            )

        def dense(units, name):
            return keras.layers.Dense(units, dtype=self.dtype_policy, name=name)

        self.layer_norm_1 = norm("layer_norm_1")
        # q, k and v in one matmul; the converter concatenates the kernels.
        self.qkv = dense(3 * embedding_dim, "qkv")
        self.attention_output = dense(embedding_dim, "attention_output")
        self.layer_norm_2 = norm("layer_norm_2")
        self.fc1 = dense(intermediate_dim, "fc1")
        self.fc2 = dense(embedding_dim, "fc2")

    def build(self, input_shape):
        self.layer_norm_1.build(input_shape)
        self.qkv.build(input_shape)
        self.attention_output.build(input_shape)
        self.layer_norm_2.build(input_shape)
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))

    def call(self, x):
        head_dim = self.embedding_dim // self.num_heads
        qkv = linear(self.qkv, layer_normalization(self.layer_norm_1, x))
        q, k, v = split_heads(qkv, self.num_heads, head_dim)
        # Float32 softmax, the default 1/sqrt(head_dim) scale.
        attention = joint_attention([q], [k], [v], causal=True)[0]
        x = x + linear(self.attention_output, attention)
        h = linear(self.fc1, layer_normalization(self.layer_norm_2, x))
        return x + linear(self.fc2, self._activation(h))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embedding_dim": self.embedding_dim,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "intermediate_activation": self.intermediate_activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


@register
class CLIPTextEncoder(keras.layers.Layer):
    """CLIP text transformer with its text projection, SD3 flavour.

    `call(token_ids)` takes int ids of shape `(batch, length)`, with
    `length <= max_sequence_length`, and returns a dict:

    - `"hidden_states"`: `(batch, length, embedding_dim)`, the hidden state
      selected by `hidden_state_index` in transformers' `hidden_states`
      indexing (0 is the embeddings, `i` the output of block `i - 1`), not
      final-layer-normed. The default -2 is the penultimate block's output,
      what SD3 uses.
    - `"pooled"`: `(batch, projection_dim)`, the final-layer-normed last
      hidden state at the first `end_token_id`, times `text_projection`.

    Attention is causal and there is no padding mask (SD3 passes none).

    Args:
        embedding_dim: int. Width (768 for CLIP-L, 1280 for CLIP-G).
        num_layers: int. Number of transformer blocks.
        num_heads: int. Attention heads.
        intermediate_dim: int. MLP hidden width.
        intermediate_activation: str. `"quick_gelu"` (CLIP-L) or `"gelu"`
            (CLIP-G).
        projection_dim: int. Output width of the bias-free text projection.
        vocabulary_size: int. Token vocabulary size.
        max_sequence_length: int. Number of learned position embeddings.
        end_token_id: int. Id of the end-of-text token.
        layer_norm_epsilon: float. Epsilon of every layer norm.
        hidden_state_index: int. Which hidden state to return.

    Examples:

    >>> import numpy as np
    >>> encoder = CLIPTextEncoder(
    ...     embedding_dim=32, num_layers=2, num_heads=4, intermediate_dim=37,
    ...     intermediate_activation="quick_gelu", projection_dim=16,
    ...     vocabulary_size=1000, end_token_id=999,
    ... )
    >>> token_ids = np.full((2, 77), 999)  # padded with the end token
    >>> token_ids[:, :3] = [998, 5, 6]
    >>> outputs = encoder(token_ids)
    >>> tuple(outputs["hidden_states"].shape), tuple(outputs["pooled"].shape)
    ((2, 77, 32), (2, 16))
    """

    def __init__(
        self,
        embedding_dim,
        num_layers,
        num_heads,
        intermediate_dim,
        intermediate_activation,
        projection_dim,
        vocabulary_size=49408,
        max_sequence_length=77,
        end_token_id=49407,
        layer_norm_epsilon=1e-5,
        hidden_state_index=-2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not -(num_layers + 1) <= hidden_state_index <= num_layers:
            raise ValueError(
                f"hidden_state_index={hidden_state_index} is out of range for "
                f"{num_layers} layers (there are {num_layers + 1} hidden states)."
            )
        self.embedding_dim = embedding_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.intermediate_activation = intermediate_activation
        self.projection_dim = projection_dim
        self.vocabulary_size = vocabulary_size
        self.max_sequence_length = max_sequence_length
        self.end_token_id = end_token_id
        self.layer_norm_epsilon = layer_norm_epsilon
        self.hidden_state_index = hidden_state_index

        self.token_embedding = keras.layers.Embedding(
            vocabulary_size,
            embedding_dim,
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        self.position_embedding = keras.layers.Embedding(
            max_sequence_length,
            embedding_dim,
            dtype=self.dtype_policy,
            name="position_embedding",
        )
        self.encoder_layers = [
            CLIPEncoderLayer(
                embedding_dim,
                num_heads,
                intermediate_dim,
                intermediate_activation,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=self.dtype_policy,
                name=f"encoder_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype="float32", name="final_layer_norm"
        )
        self.text_projection = keras.layers.Dense(
            projection_dim,
            use_bias=False,
            dtype=self.dtype_policy,
            name="text_projection",
        )

    def build(self, input_shape):
        hidden_shape = tuple(input_shape) + (self.embedding_dim,)
        self.token_embedding.build(input_shape)
        self.position_embedding.build(input_shape)
        for layer in self.encoder_layers:
            layer.build(hidden_shape)
        self.final_layer_norm.build((None, self.embedding_dim))
        self.text_projection.build((None, self.embedding_dim))

    def call(self, token_ids):
        token_ids = ops.cast(token_ids, "int32")
        length = ops.shape(token_ids)[1]
        positions = ops.arange(length, dtype="int32")
        x = self.token_embedding(token_ids)
        x = x + ops.expand_dims(self.position_embedding(positions), 0)

        selected = self.hidden_state_index % (self.num_layers + 1)
        hidden_states = x
        call = layer_caller(layers=self.encoder_layers)  # alike share a trace
        for i, layer in enumerate(self.encoder_layers):
            x = call(layer, x)
            if i + 1 == selected:
                hidden_states = x

        # Pool at the FIRST end token (CLIP-L pads with the end token). This
        # is argmax(ids == end_token_id) with first-occurrence ties, written
        # as a min so it does not rely on a backend's argmax tie-breaking;
        # a row without an end token pools position 0, as torch's argmax
        # over all-False does. It also equals transformers' legacy
        # `eos_token_id == 2` rule, argmax(ids), because the end token
        # (49407) is the largest id in CLIP's vocabulary.
        is_end = ops.equal(token_ids, self.end_token_id)
        first_end = ops.min(ops.where(is_end, positions[None, :], length), axis=1)
        first_end = ops.where(first_end == length, 0, first_end)
        pooled = ops.take_along_axis(x, first_end[:, None, None], axis=1)[:, 0]
        # The layer norm is per token, so normalising only the pooled token
        # equals indexing the normalised sequence.
        pooled = layer_normalization(self.final_layer_norm, pooled)
        pooled = self.text_projection(pooled)
        return {"hidden_states": hidden_states, "pooled": pooled}

    def compute_output_spec(self, token_ids):
        batch, length = token_ids.shape
        return {
            "hidden_states": keras.KerasTensor(
                (batch, length, self.embedding_dim), dtype=self.compute_dtype
            ),
            "pooled": keras.KerasTensor(
                (batch, self.projection_dim), dtype=self.compute_dtype
            ),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embedding_dim": self.embedding_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "intermediate_activation": self.intermediate_activation,
                "projection_dim": self.projection_dim,
                "vocabulary_size": self.vocabulary_size,
                "max_sequence_length": self.max_sequence_length,
                "end_token_id": self.end_token_id,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "hidden_state_index": self.hidden_state_index,
            }
        )
        return config
