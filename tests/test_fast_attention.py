"""The backend attention paths (`utils.fast_attention`) against Keras' op."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_diffusion.utils import cpu_kernels, fast_attention

RNG = np.random.default_rng(0)


def _normal(*shape):
    return RNG.standard_normal(shape).astype("float32")


def _heads(qkv, heads, head_dim):
    """numpy reference: `(B, T, 3*H*d)` -> token-major q, k, v."""
    b, t, _ = qkv.shape
    qkv = qkv.reshape(b, t, 3, heads, head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def test_attention_equals_dot_product_attention_across_query_blocks(monkeypatch):
    # Blocks of 4 queries split 11 into 4 + 4 + 3 on jax and tensorflow
    # (4 rows of float32 scores over 7 keys, 2 x 3 heads); torch ignores
    # blocks and must agree all the same.
    monkeypatch.setattr(fast_attention, "ATTENTION_QUERY_BLOCK", 4)
    monkeypatch.setattr(fast_attention, "TF_SCORES_BYTES", 4 * 4 * 2 * 3 * 7)
    q, k, v = _normal(2, 11, 3, 8), _normal(2, 7, 3, 8), _normal(2, 7, 3, 8)
    got = ops.convert_to_numpy(fast_attention.attention(q, k, v))
    want = ops.convert_to_numpy(ops.dot_product_attention(q, k, v))
    np.testing.assert_allclose(got, want, atol=1e-5)
    got = ops.convert_to_numpy(fast_attention.attention(q, k, v, scale=0.3))
    want = ops.convert_to_numpy(ops.dot_product_attention(q, k, v, scale=0.3))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_causal_attention_equals_dot_product_attention_across_query_blocks(
    monkeypatch,
):
    # The mask must follow each query block's offset (4 + 4 + 3).
    monkeypatch.setattr(fast_attention, "ATTENTION_QUERY_BLOCK", 4)
    monkeypatch.setattr(fast_attention, "TF_SCORES_BYTES", 4 * 4 * 2 * 3 * 11)
    q, k, v = _normal(2, 11, 3, 8), _normal(2, 11, 3, 8), _normal(2, 11, 3, 8)
    got = ops.convert_to_numpy(fast_attention.attention(q, k, v, causal=True))
    want = ops.convert_to_numpy(ops.dot_product_attention(q, k, v, is_causal=True))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Query 0 sees only key 0.
    np.testing.assert_allclose(got[:, 0], v[:, 0], atol=1e-6)
    qkv = np.concatenate([t.reshape(2, 11, 24) for t in (q, k, v)], axis=-1)
    q2, k2, v2 = fast_attention.split_heads(qkv, 3, 8)
    (joint,) = fast_attention.joint_attention([q2], [k2], [v2], causal=True)
    np.testing.assert_allclose(
        ops.convert_to_numpy(joint), want.reshape(2, 11, 24), atol=1e-5
    )


def test_split_heads_keeps_head_dim_last_and_splits_q_k_v_in_order():
    qkv = _normal(2, 5, 3 * 4 * 8)
    got = [ops.convert_to_numpy(t) for t in fast_attention.split_heads(qkv, 4, 8)]
    for part, want in zip(got, _heads(qkv, 4, 8)):
        if part.shape == (2, 4, 5, 8):  # heads-first (tensorflow)
            part = part.transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(part, want)


@pytest.mark.parametrize("query_parts", [1, 2])
def test_joint_attention_equals_attention_of_the_concatenation(query_parts):
    image, text = _normal(2, 6, 3 * 3 * 8), _normal(2, 4, 3 * 3 * 8)
    parts = [fast_attention.split_heads(p, 3, 8) for p in (image, text)]
    queries = [p[0] for p in parts][:query_parts]
    got = fast_attention.joint_attention(
        queries, [p[1] for p in parts], [p[2] for p in parts]
    )
    reference = [_heads(p, 3, 8) for p in (image, text)]
    q, k, v = (np.concatenate([r[i] for r in reference], axis=1) for i in range(3))
    want = ops.convert_to_numpy(ops.dot_product_attention(q, k, v)).reshape(2, 10, 24)
    assert [tuple(o.shape) for o in got] == [(2, 6, 24), (2, 4, 24)][:query_parts]
    np.testing.assert_allclose(ops.convert_to_numpy(got[0]), want[:, :6], atol=1e-5)
    if query_parts == 2:
        np.testing.assert_allclose(ops.convert_to_numpy(got[1]), want[:, 6:], atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_last_key_repeats_equal_that_many_copies_of_the_last_key(
    monkeypatch, dtype, atol
):
    # Blocks of 4 queries on jax: the key offsets apply in every block.
    monkeypatch.setattr(fast_attention, "ATTENTION_QUERY_BLOCK", 4)
    image, text = _normal(2, 6, 3 * 3 * 8), _normal(2, 3, 3 * 3 * 8)
    repeated = np.concatenate([text, np.repeat(text[:, -1:], 4, axis=1)], axis=1)
    reference = [_heads(p, 3, 8) for p in (image, repeated)]
    q, k, v = (np.concatenate([r[i] for r in reference], axis=1) for i in range(3))
    want = ops.convert_to_numpy(ops.dot_product_attention(q, k, v)).reshape(2, 13, 24)
    parts = [
        fast_attention.split_heads(ops.cast(p, dtype), 3, 8) for p in (image, text)
    ]
    image_out, text_out = fast_attention.joint_attention(
        [p[0] for p in parts],
        [p[1] for p in parts],
        [p[2] for p in parts],
        last_key_repeats=5,
    )
    got = [ops.convert_to_numpy(ops.cast(o, "float32")) for o in (image_out, text_out)]
    np.testing.assert_allclose(got[0], want[:, :6], atol=atol)
    np.testing.assert_allclose(got[1], want[:, 6:9], atol=atol)
    # Counted once, the last key weighs less: the check bites.
    (plain, _) = fast_attention.joint_attention(
        [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
    )
    plain = ops.convert_to_numpy(ops.cast(plain, "float32"))
    assert np.abs(plain - want[:, :6]).max() > 10 * atol
    with pytest.raises(ValueError, match="last_key_repeats"):
        fast_attention.joint_attention(
            [parts[0][0]], [parts[0][1]], [parts[0][2]], last_key_repeats=0
        )


def test_joint_attention_in_a_compiled_function_with_unknown_token_counts():
    # A tensorflow graph may have unknown batch and token axes (Keras' `fit`
    # relaxes shapes on retracing); the group sizes then come from dynamic
    # shapes.
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tensorflow's dynamic shapes; jax and torch see static ones")
    import tensorflow as tf

    def fn(image, text):
        parts = [fast_attention.split_heads(p, 2, 4) for p in (image, text)]
        return fast_attention.joint_attention(
            [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
        )

    spec = [tf.TensorSpec((None, None, 24)), tf.TensorSpec((None, None, 24))]
    image, text = _normal(1, 5, 24), _normal(1, 3, 24)
    got = tf.function(fn, input_signature=spec)(image, text)
    want = fn(image, text)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)

    def causal(qkv):  # the causal mask from dynamic token counts
        q, k, v = fast_attention.split_heads(qkv, 2, 4)
        return fast_attention.joint_attention([q], [k], [v], causal=True)[0]

    qkv = _normal(2, 6, 24)
    got = tf.function(causal, input_signature=spec[:1])(qkv)
    np.testing.assert_allclose(got.numpy(), causal(qkv).numpy(), atol=1e-6)


def test_bfloat16_attention_keeps_the_query_dtype():
    q = ops.cast(_normal(1, 6, 2, 8), "bfloat16")
    out = fast_attention.attention(q, q, q)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    want = ops.dot_product_attention(*(ops.cast(q, "float32"),) * 3)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(out, "float32")),
        ops.convert_to_numpy(want),
        atol=3e-2,
    )


@pytest.mark.parametrize("joint", [False, True])
def test_bfloat16_attention_without_bfloat16_kernels_runs_in_float32(
    joint, monkeypatch, record_dtypes
):
    # Where oneDNN has no bfloat16 kernels (an AVX2 CPU), torch's bfloat16
    # attention is slower than float32's: it runs in float32 and returns
    # bfloat16 (`cpu_kernels.emulated_bfloat16`).
    monkeypatch.setattr(cpu_kernels, "onednn_has_bfloat16", lambda: False)
    qkv = _normal(2, 6, 24)
    want = ops.convert_to_numpy(
        fast_attention.joint_attention(*_parts(qkv))[0]
        if joint
        else fast_attention.attention(*_token_major_heads(qkv))
    )
    if keras.backend.backend() == "torch":
        import torch

        sdpa = (torch.nn.functional, "scaled_dot_product_attention")
        kernel_dtypes = record_dtypes(*sdpa)
    qkv = ops.cast(qkv, "bfloat16")
    if joint:
        out = fast_attention.joint_attention(*_parts(qkv))[0]
    else:
        out = fast_attention.attention(*_token_major_heads(qkv))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    if keras.backend.backend() == "torch":
        assert kernel_dtypes == [torch.float32]
    got = ops.convert_to_numpy(ops.cast(out, "float32"))
    np.testing.assert_allclose(got, want.reshape(got.shape), atol=3e-2, rtol=2e-2)


def _token_major_heads(qkv):
    b, t = qkv.shape[:2]
    return [ops.reshape(p, (b, t, 2, 4)) for p in ops.split(qkv, 3, axis=-1)]


def _parts(qkv):
    q, k, v = fast_attention.split_heads(qkv, 2, 4)
    return [q], [k], [v]


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(fast_attention)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="tensorflow's softmax path"
)
def test_tf_bfloat16_softmax_is_the_float32_softmax_rounded(monkeypatch):
    import tensorflow as tf

    scores = tf.cast(_normal(2, 3, 200, 300) * 4.0, tf.bfloat16)
    want = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1), tf.bfloat16)
    # The oneDNN path where this machine has it; the upcast path always.
    switches = [False] + ([True] if cpu_kernels.tf_onednn_bfloat16() else [])
    for on in switches:
        monkeypatch.setattr(fast_attention, "tf_onednn_bfloat16", lambda on=on: on)
        got = fast_attention._tf_softmax(scores)
        assert got.dtype == tf.bfloat16
        np.testing.assert_array_equal(
            tf.cast(got, tf.float32).numpy(), tf.cast(want, tf.float32).numpy()
        )


@pytest.mark.parametrize("repeats", [1, 5])
def test_jax_bfloat16_attention_asks_for_float32_dot_results(
    repeats, monkeypatch, dot_result_dtypes
):
    # As `fast_ops.linear`: XLA's fast bfloat16 CPU dot returns float32, and
    # the scores go to a float32 softmax anyway.
    if keras.backend.backend() != "jax":
        pytest.skip("a jax dot's result type")
    monkeypatch.setattr(fast_attention, "ATTENTION_QUERY_BLOCK", 4)
    q = ops.cast(_normal(1, 6, 2, 8), "bfloat16")

    def fn(q):
        return fast_attention.joint_attention([q], [q], [q], last_key_repeats=repeats)

    # Two blocks of queries, scores and output each, plus the last key's
    # recomputed score per block when it repeats.
    assert dot_result_dtypes(fn, q) == ["float32"] * 2 * (2 + (repeats > 1))


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tensorflow's query blocks"
)
@pytest.mark.parametrize("causal", [False, True])
def test_tensorflow_query_blocks_run_one_after_another_with_the_same_numbers(
    monkeypatch, causal
):
    import tensorflow as tf

    # Heads-first (B, heads, T, head_dim), the last key counted 5 times.
    q, k, v = (_normal(2, 3, 11, 8) for _ in range(3))

    def attend():
        fn = tf.function(
            lambda q, k, v: fast_attention._tf_attend(q, k, v, 0.3, causal, 5),
            autograph=False,
        )
        graph = fn.get_concrete_function(q, k, v).graph
        return ops.convert_to_numpy(fn(q, k, v)), graph

    whole, graph = attend()
    assert not any(op.control_inputs for op in graph.get_operations())
    monkeypatch.setattr(fast_attention, "TF_SCORES_BYTES", 4 * 4 * 2 * 3 * 11)
    blocked, graph = attend()
    # Blocks 2 and 3 (4 + 4 + 3 queries) each wait for the block before:
    # their ops have control inputs, the outputs of blocks 1 and 2 (the
    # first two parts of the concatenation that joins the blocks).
    join = [op for op in graph.get_operations() if op.type == "ConcatV2"][-1]
    parts = [t.op for t in join.inputs[:-1]]  # the last input is the axis
    assert len(parts) == 3
    waited = {c for op in graph.get_operations() for c in op.control_inputs}
    assert waited == set(parts[:2])
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tensorflow graph")
def test_half_precision_scores_use_their_own_block_limit(monkeypatch):
    import tensorflow as tf

    # 11 queries over 11 keys, 2 x 3 heads: 2 bytes a score in bfloat16.
    q, k = (tf.zeros((2, 3, 11, 8), dtype) for dtype in ("bfloat16", "float32"))
    monkeypatch.setattr(fast_attention, "TF_SCORES_BYTES", 4 * 11 * 2 * 3 * 11)
    monkeypatch.setattr(fast_attention, "TF_HALF_SCORES_BYTES", 2 * 2 * 3 * 11 * 5)
    assert fast_attention._tf_block_rows(q, q) == 5
    assert fast_attention._tf_block_rows(k, k) is None
