"""Building blocks of the SD3 / SD3.5 MMDiT: embeddings, MLP, joint block.

The residual streams (image tokens and text tokens) are carried in float32
whatever the dtype policy; the matmuls (q/k/v, attention, output and MLP
projections) run in the policy's compute dtype; layer norms, RMS q/k norms,
the timestep embedding and the AdaLN modulation (projection and arithmetic)
run in float32. The blocks are created with `autocast=False` so that Keras
does not cast the float32 residual streams down on the way in.
"""

import math

import keras
from keras import ops

from keras_diffusion.api_export import register
from keras_diffusion.utils import fast_elementwise
from keras_diffusion.utils.fast_attention import joint_attention, split_heads
from keras_diffusion.utils.fast_elementwise import gated_residual
from keras_diffusion.utils.fast_ops import (
    affine,
    call_layer,
    cast,
    chunks,
    linear,
)

LAYER_NORM_EPSILON = 1e-6
QK_NORM_EPSILON = 1e-6
TIMESTEP_CHANNELS = 256


def timestep_embedding(timestep, dim=TIMESTEP_CHANNELS, max_period=10000.0):
    """Sinusoidal timestep embedding, cosine half first, in float32.

    Frequencies are `exp(-log(max_period) * i / (dim // 2))` for
    `i < dim // 2` (no frequency shift), applied to the raw timestep.

    Args:
        timestep: `(batch,)` float timesteps, e.g. `1000 * sigma`.
        dim: int, even. Output width.
        max_period: float. Longest period.

    Returns:
        `(batch, dim)` float32: `[cos(t * f), sin(t * f)]`.

    Examples:

    >>> import numpy as np
    >>> emb = timestep_embedding(np.array([0.0, 500.0], "float32"), dim=8)
    >>> tuple(emb.shape), [float(v) for v in emb[0]]
    ((2, 8), [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    """
    half = dim // 2
    t = ops.cast(timestep, "float32")
    exponent = ops.arange(half, dtype="float32") * (-math.log(max_period) / half)
    angles = t[:, None] * ops.exp(exponent)[None, :]
    return ops.concatenate([ops.cos(angles), ops.sin(angles)], axis=-1)


def norm_modulate(x, shift, scale, dtype="float32"):
    """AdaLN of a non-affine layer norm (last axis, eps 1e-6): float32
    arithmetic, returned in `dtype`."""
    return fast_elementwise.norm_modulate(x, shift, scale, LAYER_NORM_EPSILON, dtype)


@register
class Modulation(keras.layers.Layer):
    """AdaLN modulation projection, `conditioning @ kernel + bias`, in float32.

    The weights stay in the policy's variable dtype (they are a large share
    of the model, and checkpoints ship them in half precision); the matmul
    upcasts them and runs in float32, and returns float32.

    Args:
        input_dim: int. Width of the conditioning vector.
        units: int. Output width (chunks times `hidden_dim`).

    Examples:

    >>> import keras
    >>> import numpy as np
    >>> layer = Modulation(16, 6 * 16, dtype="bfloat16")
    >>> out = layer(np.ones((2, 16), "float32"))
    >>> tuple(out.shape), keras.backend.standardize_dtype(out.dtype)
    ((2, 96), 'float32')
    """

    def __init__(self, input_dim, units, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self.input_dim = input_dim
        self.units = units

    def build(self, input_shape=None):
        self.kernel = self.add_weight(
            shape=(self.input_dim, self.units),
            initializer="glorot_uniform",
            autocast=False,
            name="kernel",
        )
        self.bias = self.add_weight(
            shape=(self.units,), initializer="zeros", autocast=False, name="bias"
        )

    def call(self, conditioning):
        f32 = "float32"
        kernel, bias = cast(self.kernel, f32), cast(self.bias, f32)
        return affine(cast(conditioning, f32), kernel, bias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def compute_output_spec(self, conditioning):
        shape = self.compute_output_shape(conditioning.shape)
        return keras.KerasTensor(shape, dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({"input_dim": self.input_dim, "units": self.units})
        return config


@register
class FeedForward(keras.layers.Layer):
    """Two-layer MLP with tanh-approximated GELU, `dim -> ratio*dim -> dim`.

    Args:
        hidden_dim: int. Input and output width.
        mlp_ratio: int. Width multiplier of the hidden layer.

    Examples:

    >>> import numpy as np
    >>> mlp = FeedForward(16, mlp_ratio=2)
    >>> tuple(mlp(np.zeros((2, 3, 16), "float32")).shape)
    (2, 3, 16)
    """

    def __init__(self, hidden_dim, mlp_ratio=4, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.mlp_ratio = mlp_ratio
        self.dense_1 = keras.layers.Dense(
            hidden_dim * mlp_ratio, name="dense_1", dtype=self.dtype_policy
        )
        self.dense_2 = keras.layers.Dense(
            hidden_dim, name="dense_2", dtype=self.dtype_policy
        )

    def build(self, input_shape=None):
        self.dense_1.build((None, None, self.hidden_dim))
        self.dense_2.build((None, None, self.hidden_dim * self.mlp_ratio))

    def call(self, x):
        return linear(self.dense_2, linear(self.dense_1, x, "gelu_tanh"))

    def get_config(self):
        config = super().get_config()
        config.update({"hidden_dim": self.hidden_dim, "mlp_ratio": self.mlp_ratio})
        return config


@register
class MMDiTBlock(keras.layers.Layer):
    """One MMDiT joint block: AdaLN-Zero, joint attention, gated MLPs.

    `call(x, context, conditioning)` takes the float32 image tokens
    `(B, N, hidden_dim)`, float32 text tokens `(B, L, hidden_dim)` and
    `conditioning = silu(temb)` `(B, hidden_dim)`. Image and text tokens
    are projected with their own weights, optionally RMS-normalised per
    head, and attend jointly over `[image tokens; text tokens]`.

    Returns `(x, context)`, or only `x` when `context_pre_only` (the last
    block: its text stream is modulated by a 2-chunk continuous AdaLN
    `(scale, shift)` and only serves as keys and values).

    `last_token_repeats` (a Python int) counts the last text token as that
    many identical tokens (see `MMDiT`).

    Args:
        hidden_dim: int. Width of both streams.
        num_heads: int. Attention heads; must divide `hidden_dim`.
        mlp_ratio: int. MLP width multiplier.
        qk_norm: `None` or `"rms_norm"` (per-head RMS norm on q and k of
            both streams, eps 1e-6).
        context_pre_only: bool. See above.
        dual_attention: bool. MMDiT-X: a second, image-only self-attention
            with its own modulation (9 AdaLN chunks instead of 6).

    Examples:

    >>> import numpy as np
    >>> block = MMDiTBlock(16, 2, qk_norm="rms_norm", dual_attention=True)
    >>> x, c = block(
    ...     np.zeros((2, 4, 16), "float32"),
    ...     np.zeros((2, 3, 16), "float32"),
    ...     np.zeros((2, 16), "float32"),
    ... )
    >>> tuple(x.shape), tuple(c.shape)
    ((2, 4, 16), (2, 3, 16))
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_ratio=4,
        qk_norm=None,
        context_pre_only=False,
        dual_attention=False,
        **kwargs,
    ):
        super().__init__(autocast=False, **kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}."
            )
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {qk_norm!r}.")
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.mlp_ratio = mlp_ratio
        self.qk_norm = qk_norm
        self.context_pre_only = bool(context_pre_only)
        self.dual_attention = bool(dual_attention)
        self._x_chunks = 9 if self.dual_attention else 6
        self._context_chunks = 2 if self.context_pre_only else 6

        def dense(units, name):
            return keras.layers.Dense(units, name=name, dtype=self.dtype_policy)

        def rms_norm(name):
            if qk_norm is None:
                return None
            return keras.layers.RMSNormalization(
                axis=-1, epsilon=QK_NORM_EPSILON, name=name, dtype="float32"
            )

        d = hidden_dim

        def modulation(chunks, name):
            return Modulation(d, chunks * d, name=name, dtype=self.dtype_policy)

        self.x_modulation = modulation(self._x_chunks, "x_modulation")
        self.context_modulation = modulation(self._context_chunks, "context_modulation")
        # q, k and v of a stream in one matmul (the converter concatenates).
        self.x_qkv = dense(3 * d, "x_qkv")
        self.context_qkv = dense(3 * d, "context_qkv")
        self.x_query_norm = rms_norm("x_query_norm")
        self.x_key_norm = rms_norm("x_key_norm")
        self.context_query_norm = rms_norm("context_query_norm")
        self.context_key_norm = rms_norm("context_key_norm")
        self.x_attention_output = dense(d, "x_attention_output")
        self.x_mlp = FeedForward(d, mlp_ratio, name="x_mlp", dtype=self.dtype_policy)
        if self.context_pre_only:
            self.context_attention_output = None
            self.context_mlp = None
        else:
            self.context_attention_output = dense(d, "context_attention_output")
            self.context_mlp = FeedForward(
                d, mlp_ratio, name="context_mlp", dtype=self.dtype_policy
            )
        if self.dual_attention:
            self.x_qkv_2 = dense(3 * d, "x_qkv_2")
            self.x_query_norm_2 = rms_norm("x_query_norm_2")
            self.x_key_norm_2 = rms_norm("x_key_norm_2")
            self.x_attention_output_2 = dense(d, "x_attention_output_2")
        else:
            self.x_qkv_2 = self.x_query_norm_2 = self.x_key_norm_2 = None
            self.x_attention_output_2 = None

    def build(self, x_shape=None, context_shape=None, conditioning_shape=None):
        tokens = (None, None, self.hidden_dim)
        heads = (None, None, self.num_heads, self.head_dim)
        self.x_modulation.build((None, self.hidden_dim))
        self.context_modulation.build((None, self.hidden_dim))
        for layer in (
            self.x_qkv,
            self.context_qkv,
            self.x_attention_output,
            self.x_mlp,
            self.context_attention_output,
            self.context_mlp,
            self.x_qkv_2,
            self.x_attention_output_2,
        ):
            if layer is not None:
                layer.build(tokens)
        for norm in (
            self.x_query_norm,
            self.x_key_norm,
            self.context_query_norm,
            self.context_key_norm,
            self.x_query_norm_2,
            self.x_key_norm_2,
        ):
            if norm is not None:
                norm.build(heads)

    def _heads(self, qkv, query_norm, key_norm):
        """`(B, T, 3*D)` -> q, k, v in `joint_attention`'s layout, with the
        per-head RMS norms (on the last axis, `head_dim`) where set."""
        q, k, v = split_heads(qkv, self.num_heads, self.head_dim)
        if query_norm is not None:
            # The norms are float32 layers; `call_layer` does not cast inputs.
            f32, dtype = "float32", self.compute_dtype
            q = cast(call_layer(query_norm, cast(q, f32)), dtype)
            k = cast(call_layer(key_norm, cast(k, f32)), dtype)
        return q, k, v

    def call(self, x, context, conditioning, last_token_repeats=1):
        f32 = "float32"
        x = cast(x, f32)
        context = cast(context, f32)
        conditioning = cast(conditioning, f32)
        mod = chunks(call_layer(self.x_modulation, conditioning), self._x_chunks)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        cmod = chunks(
            call_layer(self.context_modulation, conditioning), self._context_chunks
        )

        dtype = self.compute_dtype
        x_in = norm_modulate(x, shift_msa, scale_msa, dtype)
        if self.context_pre_only:
            c_scale, c_shift = cmod  # continuous AdaLN: scale before shift
            c_in = norm_modulate(context, c_shift, c_scale, dtype)
        else:
            c_in = norm_modulate(context, cmod[0], cmod[1], dtype)

        qx, kx, vx = self._heads(
            linear(self.x_qkv, x_in), self.x_query_norm, self.x_key_norm
        )
        qc, kc, vc = self._heads(
            linear(self.context_qkv, c_in),
            self.context_query_norm,
            self.context_key_norm,
        )
        # Joint attention over [image tokens; text tokens]. A pre-only block
        # drops its text outputs, so only image queries are computed.
        queries = [qx] if self.context_pre_only else [qx, qc]
        attention = joint_attention(
            queries, [kx, kc], [vx, vc], last_key_repeats=last_token_repeats
        )
        x_attention = linear(self.x_attention_output, attention[0])
        x_input = x
        x = gated_residual(x, gate_msa, x_attention)

        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            # MMDiT-X: the second attention also reads the block's input.
            x_in2 = norm_modulate(x_input, shift_msa2, scale_msa2, dtype)
            q2, k2, v2 = self._heads(
                linear(self.x_qkv_2, x_in2), self.x_query_norm_2, self.x_key_norm_2
            )
            x_attention2 = linear(
                self.x_attention_output_2, joint_attention([q2], [k2], [v2])[0]
            )
            x = gated_residual(x, gate_msa2, x_attention2)

        x_mlp = call_layer(self.x_mlp, norm_modulate(x, shift_mlp, scale_mlp, dtype))
        x = gated_residual(x, gate_mlp, x_mlp)
        if self.context_pre_only:
            return x

        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod[2:]
        c_attention = linear(self.context_attention_output, attention[1])
        context = gated_residual(context, c_gate_msa, c_attention)
        c_mlp = call_layer(
            self.context_mlp, norm_modulate(context, c_shift_mlp, c_scale_mlp, dtype)
        )
        context = gated_residual(context, c_gate_mlp, c_mlp)
        return x, context

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "qk_norm": self.qk_norm,
                "context_pre_only": self.context_pre_only,
                "dual_attention": self.dual_attention,
            }
        )
        return config
