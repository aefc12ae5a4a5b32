"""The fastest CPU path of softmax attention, per backend.

Model code calls these instead of `ops.dot_product_attention`; the results
agree with it to float rounding (tests/test_fast_attention.py). The softmax
is float32 arithmetic on every path (on tensorflow, bfloat16 scores in and
weights out where oneDNN computes it: `_tf_softmax`).

- torch: its fused `scaled_dot_product_attention`, fed heads-first memory
  (in float32 for bfloat16 inputs on a CPU without bfloat16 kernels:
  `cpu_kernels.emulated_bfloat16`);
- jax: einsums over blocks of `ATTENTION_QUERY_BLOCK` queries (XLA keeps a
  block's score matrix in cache; 1.6-3x faster than Keras' op on CPU);
- tensorflow: two batched matmuls on heads-first tensors,
  `matmul(q, k, transpose_b=True)`. An einsum transposes its operands again
  on every call. Query blocks gain no speed where each graph op runs alone,
  but scores beyond `TF_SCORES_BYTES` (`TF_HALF_SCORES_BYTES` in 16-bit
  dtypes) run in blocks, one after another, for memory (`_tf_attend`).
  `split_heads` gives q, k and v heads-first straight from the fused q/k/v
  projection (one transpose per stream; the three are then free leading-axis
  slices).

`benchmarks/attention_speed.py` times `attention` against Keras' op.
"""

import math

import keras  # noqa: F401 (the examples use it)
from keras import ops

from keras_diffusion.utils.backend import backend_name
from keras_diffusion.utils.cpu_kernels import emulated_bfloat16, tf_onednn_bfloat16
from keras_diffusion.utils.fast_ops import cast, matmul_in_float32

# Queries per block of `attention` on jax (see there).
ATTENTION_QUERY_BLOCK = 512


def attention(query, key, value, scale=None, causal=False):
    """Softmax attention, `(B, T, heads, head_dim)` in and out.

    The result has the query's dtype; `scale` defaults to `head_dim**-0.5`.
    With `causal`, query `i` attends to keys `0..i` only.

    Examples:

    >>> import numpy as np
    >>> q = np.random.default_rng(0).standard_normal((1, 5, 2, 4), "float32")
    >>> out = attention(q, q, q)
    >>> ref = keras.ops.dot_product_attention(q, q, q)
    >>> bool(np.allclose(out, ref, atol=1e-6))
    True
    """
    scale = _scale(query, scale)
    backend = backend_name()
    if backend == "torch":
        # Without bfloat16 kernels on this CPU, compute in float32 (`cpu_kernels`).
        emulated = emulated_bfloat16(query)
        if emulated:
            query, key, value = (cast(t, "float32") for t in (query, key, value))
        out = ops.dot_product_attention(
            query, key, value, scale=scale, is_causal=causal
        )
        return cast(out, "bfloat16") if emulated else out
    if backend == "tensorflow":
        import tensorflow as tf

        query, key, value = (tf.transpose(t, (0, 2, 1, 3)) for t in (query, key, value))
        out = _tf_attend(query, key, value, scale, causal)
        return tf.transpose(out, (0, 2, 1, 3))
    return _jax_attend(query, key, value, scale, causal)


def split_heads(qkv, num_heads, head_dim):
    """A fused q/k/v projection `(B, T, 3 * heads * head_dim)` -> q, k, v.

    Each comes in the layout `joint_attention` reads on this backend:
    `(B, heads, T, head_dim)` on tensorflow, `(B, T, heads, head_dim)`
    elsewhere (views of `qkv` on torch). Either way the last axis is
    `head_dim`, so per-head norms apply as they are.

    Examples:

    >>> import numpy as np
    >>> q, k, v = split_heads(np.zeros((2, 5, 3 * 4 * 8), "float32"), 4, 8)
    >>> sorted(tuple(q.shape)) == [2, 4, 5, 8]
    True
    """
    if backend_name() == "torch":
        qkv = ops.convert_to_tensor(qkv).unflatten(-1, (3, num_heads, head_dim))
        return qkv.unbind(2)
    shape = ops.shape(qkv)
    qkv = ops.reshape(qkv, (shape[0], shape[1], 3, num_heads, head_dim))
    if backend_name() == "tensorflow":
        import tensorflow as tf

        # Unstacking a contiguous tensor along its first axis shares its
        # buffer, and is one graph op (three slices trace as ~12).
        return tuple(tf.unstack(tf.transpose(qkv, (2, 0, 3, 1, 4)), axis=0))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def joint_attention(
    queries, keys, values, scale=None, causal=False, last_key_repeats=1
):
    """Attention over token groups joined along the token axis.

    `queries`, `keys` and `values` are lists of parts (image tokens, text
    tokens) as `split_heads` lays them out. Returns one `(B, T_i, heads *
    head_dim)` output per query part: `attention` of the concatenations,
    split back into the query groups with their heads merged. Each output
    is one contiguous copy, ready for its projection's matmul. `causal` as
    in `attention`, over the joined tokens.

    `last_key_repeats` (a Python int) counts the last key and value as that
    many identical copies, exactly as their softmax weighs them (`MMDiT`
    collapses the identical zero T5 tokens of a model without T5 this way):
    on torch `log(repeats)` is added to the last key's score; on jax and
    tensorflow the last value is scaled by `repeats` and the softmax's
    normalization counts the last weight `repeats` times.

    Examples:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = (split_heads(p, 2, 4) for p in rng.standard_normal((2, 1, 3, 24)))
    >>> out_a, out_b = joint_attention([a[0], b[0]], [a[1], b[1]], [a[2], b[2]])
    >>> tuple(out_a.shape), tuple(out_b.shape)
    ((1, 3, 8), (1, 3, 8))
    """
    scale = _scale(queries[0], scale)
    repeats = int(last_key_repeats)
    if repeats < 1:
        raise ValueError(f"last_key_repeats must be >= 1, got {last_key_repeats}.")
    backend = backend_name()
    if backend == "tensorflow":
        import tensorflow as tf

        def join(parts):
            return tf.concat(parts, axis=2) if len(parts) > 1 else parts[0]

        out = _tf_attend(
            join(queries), join(keys), join(values), scale, causal, repeats
        )
        out = tf.transpose(out, (0, 2, 1, 3))
        sizes = [ops.shape(q)[2] for q in queries]
        if all(isinstance(size, int) for size in sizes):
            # One split op where the sizes are known (slices trace as more).
            hidden = out.shape[2] * out.shape[3]
            merged = tf.reshape(out, (-1, sum(sizes), hidden))
            return tf.split(merged, sizes, axis=1) if len(sizes) > 1 else [merged]
    elif backend == "torch":
        out = _torch_joint_attend(queries, keys, values, scale, causal, repeats)
        # Each part's reshape of the (B, T, heads, head_dim) view copies it.
        parts = out.split([q.shape[1] for q in queries], dim=1)
        return [part.flatten(2) for part in parts]
    else:

        def join(parts):
            return ops.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

        out = _jax_attend(
            join(queries), join(keys), join(values), scale, causal, repeats=repeats
        )
        sizes = [ops.shape(q)[1] for q in queries]
    batch, hidden = ops.shape(out)[0], out.shape[2] * out.shape[3]
    outputs, start = [], 0
    for size in sizes:
        part = out[:, start : start + size]
        outputs.append(ops.reshape(part, (batch, size, hidden)))
        start = start + size
    return outputs


def _scale(query, scale):
    return float(query.shape[-1]) ** -0.5 if scale is None else float(scale)


def _causal_mask(queries, keys, start=0):
    """`(queries, keys)` booleans: query `start + i` may see key `j <= start + i`."""
    rows = ops.expand_dims(ops.arange(queries, dtype="int32") + start, 1)
    return ops.expand_dims(ops.arange(keys, dtype="int32"), 0) <= rows


def _masked(scores, mask):
    # Masked scores get float32's lowest value: their weight underflows to
    # 0, and no row is fully masked (key 0 is always visible).
    return ops.where(mask, scores, ops.cast(-3.4028235e38, "float32"))


def _scale_last_token(value, repeats, axis):
    """`value` with its last entry along the token `axis` times `repeats`
    (scaled in float32, stored in `value`'s dtype)."""
    leading = (slice(None),) * axis
    last = ops.cast(value[leading + (slice(-1, None),)], "float32") * float(repeats)
    rest = value[leading + (slice(None, -1),)]
    return ops.concatenate([rest, ops.cast(last, value.dtype)], axis=axis)


def _tf_attend(query, key, value, scale, causal=False, repeats=1):
    """Heads-first `(B, heads, T, head_dim)` attention on tensorflow.

    `repeats` counts the last key and value that many times. The softmax
    runs on the plain scores, and the output is corrected after: with `w`
    the last key's weight, the repeated keys' softmax is the plain one
    divided by `1 + (repeats - 1) * w`, the last weight times `repeats`. So
    the value's last row is scaled by `repeats` and the output divided by
    that sum, work on `(B, heads, T, head_dim)` tensors instead of a pass
    that adds `log(repeats)` to the `(B, heads, T, T)` scores.

    Where the scores would exceed `TF_SCORES_BYTES`, the queries run
    in blocks, one after the other (each waits on the last: control
    dependencies), so that one block's scores and weights are alive at a
    time; tensorflow's allocator keeps the largest working set a process
    ever had (docs/performance.md).
    """
    import tensorflow as tf

    dtype = query.dtype
    query = query * tf.cast(scale, dtype)
    if repeats > 1:
        value = _scale_last_token(value, repeats, axis=2)
    rows = _tf_block_rows(query, key)
    if rows is None:
        return _tf_attend_block(query, key, value, dtype, causal, 0, repeats)
    outputs = []
    for start in range(0, query.shape[2], rows):
        with tf.control_dependencies(outputs[-1:]):
            block = query[:, :, start : start + rows]
        outputs.append(
            _tf_attend_block(block, key, value, dtype, causal, start, repeats)
        )
    return tf.concat(outputs, axis=2)


# The largest score tensor (`(B, heads, queries, keys)`, in the query's
# dtype) that tensorflow's attention computes in one piece, in bytes: wide's
# float32 scores (233 MB) run in 7 blocks, bench's (58 MB) in 2. Half-
# precision scores get smaller blocks: with bench's whole 33 MB bfloat16
# scores a call's loop grew the pool allocator by 0.17 GB in 2 of 4 processes
# (`rss_phases.py`), with 8 MB blocks in 1 of 9, at the same step time; in
# float32, 8 MB blocks slowed the first call instead.
TF_SCORES_BYTES = 32 * 2**20
TF_HALF_SCORES_BYTES = 8 * 2**20


def _tf_block_rows(query, key):
    """Queries per block where the scores need blocks (static shapes), or None."""
    batch, heads, tokens = query.shape[:3]
    keys = key.shape[2]
    if not all(isinstance(n, int) for n in (batch, heads, tokens, keys)):
        return None
    row_bytes = query.dtype.size * batch * heads * keys
    limit = TF_HALF_SCORES_BYTES if query.dtype.size == 2 else TF_SCORES_BYTES
    if tokens * row_bytes <= limit:
        return None
    return max(1, limit // row_bytes)


def _tf_attend_block(query, key, value, dtype, causal, start, repeats):
    """`_tf_attend` for queries `start...`, `value` already scaled."""
    import tensorflow as tf

    scores = tf.matmul(query, key, transpose_b=True)
    if causal:
        scores = tf.cast(scores, "float32")
        mask = _causal_mask(ops.shape(query)[2], ops.shape(key)[2], start)
        scores = _masked(scores, mask)
    weights = tf.cast(_tf_softmax(scores), value.dtype)
    if repeats > 1:
        total = 1.0 + (repeats - 1) * tf.cast(weights[:, :, :, -1:], "float32")
    out = tf.matmul(weights, value)
    if repeats > 1:
        out = tf.cast(out, "float32") / total
    return tf.cast(out, dtype)


def _tf_softmax(scores):
    """Softmax over the last axis in float32 arithmetic, in `scores`' dtype.

    oneDNN's bfloat16 softmax computes in float32 and rounds once: the same
    numbers as a float32 softmax of the upcast scores, rounded (bit for bit
    in tests/test_fast_attention.py), without the two casts, which cost as
    much as the softmax on `bench`. Elsewhere the scores are upcast.
    """
    import tensorflow as tf

    if scores.dtype == tf.bfloat16 and tf_onednn_bfloat16():
        return tf.nn.softmax(scores, axis=-1)
    return tf.cast(tf.nn.softmax(tf.cast(scores, "float32"), axis=-1), scores.dtype)


def _torch_joint_attend(queries, keys, values, scale, causal=False, repeats=1):
    """Token-major parts in, token-major `(B, T, heads, head_dim)` view out.

    The parts are joined in heads-first memory, which torch's fused kernel
    reads a few percent faster than the token-major views a token-axis
    concatenation gives (`benchmarks/linear_speed.py`); the join is the
    copy the concatenation makes anyway.
    """
    import torch

    def heads_first(parts):
        parts = [ops.convert_to_tensor(p).transpose(1, 2) for p in parts]
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous()

    dtype = queries[0].dtype
    # Without bfloat16 kernels on this CPU, compute in float32 (`cpu_kernels`).
    work = torch.float32 if emulated_bfloat16(queries[0]) else dtype
    keys = heads_first(keys).to(work)
    # The kernel takes an additive mask in the query's dtype (log(77) is
    # 4.34375 in bfloat16: a 6e-5 relative error in that key's weight).
    mask = None
    if repeats > 1:
        mask = torch.zeros((1, 1, 1, keys.shape[2]), dtype=work, device=keys.device)
        mask[..., -1] = math.log(repeats)
    out = torch.nn.functional.scaled_dot_product_attention(
        heads_first(queries).to(work),
        keys,
        heads_first(values).to(work),
        attn_mask=mask,
        scale=scale,
        is_causal=causal,
    )
    return out.to(dtype).transpose(1, 2)


def _jax_attend(query, key, value, scale, causal=False, repeats=1):
    """Token-major attention in blocks of `ATTENTION_QUERY_BLOCK` queries.

    `repeats` counts the last key and value that many times. Rather than
    adding `log(repeats)` to its scores (XLA materializes that offset,
    broadcast to the scores' shape, as an operand of the score matmul's
    fusion: 27 MB per block of a `bench` step, all of a loop's blocks live
    at once), the value is scaled by `repeats` and the softmax's sum counts
    the last weight `repeats` times: the same weights, with no extra pass.
    """
    dtype = query.dtype
    query = ops.multiply(query, ops.cast(scale, dtype))
    if repeats > 1:
        value = _scale_last_token(value, repeats, axis=1)
    tokens = query.shape[1]
    block = ATTENTION_QUERY_BLOCK
    if not isinstance(tokens, int) or tokens <= block:
        return _attend_block(query, key, value, dtype, causal, repeats=repeats)
    blocks = [
        _attend_block(
            query[:, start : start + block], key, value, dtype, causal, start, repeats
        )
        for start in range(0, tokens, block)
    ]
    return ops.concatenate(blocks, axis=1)


def _attend_block(query, key, value, dtype, causal=False, start=0, repeats=1):
    # Float32 results: the softmax's dtype, and XLA's fast bfloat16 dot.
    scores = matmul_in_float32(query, key, "bqhd,bkhd->bhqk")
    if causal:
        scores = _masked(
            scores, _causal_mask(ops.shape(query)[1], ops.shape(key)[1], start)
        )
    if repeats > 1:
        # Softmax written out: the last key's weight counts `repeats` times
        # in the sum; its value (`_jax_attend`) already carries the factor.
        # The last key's score is recomputed (a matrix-vector product), not
        # sliced out of the scores: a slice would make XLA write them out.
        top = ops.max(scores, axis=-1, keepdims=True)
        last = matmul_in_float32(query, key[:, -1:], "bqhd,bkhd->bhqk")
        last = ops.exp(last - top)
        exp = ops.exp(scores - top)
        total = ops.sum(exp, axis=-1, keepdims=True) + (repeats - 1) * last
        weights = exp / total
    else:
        weights = ops.softmax(scores, axis=-1)
    weights = ops.cast(weights, value.dtype)
    return ops.cast(matmul_in_float32(weights, value, "bhqk,bkhd->bqhd"), dtype)
