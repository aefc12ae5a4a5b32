"""Attention on CPU: `ops.dot_product_attention` vs `utils.fast_attention.attention`.

    KERAS_BACKEND=jax python benchmarks/attention_speed.py [--tokens 1178]
        [--last-key-repeats 77] [--dtype bfloat16]

Times, compiled (jax.jit / tf.function; torch eager), the attention of one
`bench` MMDiT block with guidance (batch 2, 6 heads of 64, 1,024 image plus
154 text tokens): Keras' `ops.dot_product_attention`, one plain einsum
attention, and ours (`keras_diffusion.utils.fast_attention.attention`: blocks of
queries on jax, heads-first batched matmuls on tensorflow, torch's fused
kernel on torch). Prints the best
of `--repeats` runs, interleaved, and the max abs difference to Keras' op.

`--last-key-repeats N` also times `fast_attention.joint_attention` with its
last key counted N times (a model without T5: `--tokens 1102
--last-key-repeats 77` is `bench`'s 1024 + 77 + 1 tokens), against the same
call without the count and on the N - 1 copies written out.
"""

import argparse
import os
import sys
import time

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "src"))

from keras_diffusion.utils import fast_attention  # noqa: E402


def plain_einsum(q, k, v):
    scores = ops.einsum("bqhd,bkhd->bhqk", q * (q.shape[-1] ** -0.5), k)
    return ops.einsum("bhqk,bkhd->bqhd", ops.softmax(scores, axis=-1), v)


def compiled(fn):
    name = keras.config.backend()
    if name == "jax":
        import jax

        return jax.jit(fn)
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1178)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--last-key-repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (2, args.tokens, args.heads, 64)
    q, k, v = (
        ops.cast(rng.standard_normal(shape, "float32"), args.dtype) for _ in "qkv"
    )
    variants = {
        "ops.dot_product_attention": compiled(ops.dot_product_attention),
        "plain einsum": compiled(plain_einsum),
        "ours (fast_attention.attention)": compiled(fast_attention.attention),
    }
    inputs = {name: (q, k, v) for name in variants}
    # References in float32 from the (rounded) inputs.
    reference = ops.convert_to_numpy(
        ops.dot_product_attention(*(ops.cast(t, "float32") for t in (q, k, v)))
    )
    references = {name: reference for name in variants}
    repeats = args.last_key_repeats
    if repeats > 1:
        # The fused q/k/v layout `joint_attention` reads on each backend.
        def fused(q, k, v):
            return ops.reshape(
                ops.stack([q, k, v], axis=2), (2, -1, 3 * 64 * args.heads)
            )

        def joint(qkv, repeats=1):
            parts = fast_attention.split_heads(qkv, args.heads, 64)
            return fast_attention.joint_attention(
                [parts[0]], [parts[1]], [parts[2]], last_key_repeats=repeats
            )[0]

        copies = [ops.repeat(t[:, -1:], repeats - 1, axis=1) for t in (q, k, v)]
        full = [ops.concatenate([t, c], axis=1) for t, c in zip((q, k, v), copies)]
        expected = ops.convert_to_numpy(
            ops.dot_product_attention(*(ops.cast(t, "float32") for t in full))
        )
        expected = expected.reshape(2, -1, 64 * args.heads)
        tag = f"joint_attention, last key x{repeats}"
        variants[tag] = compiled(lambda qkv: joint(qkv, repeats))
        variants["joint_attention, same tokens"] = compiled(joint)
        variants[f"joint_attention, {repeats - 1} copies"] = compiled(joint)
        inputs[tag] = inputs["joint_attention, same tokens"] = (fused(q, k, v),)
        inputs[f"joint_attention, {repeats - 1} copies"] = (fused(*full),)
        references[tag] = expected[:, : args.tokens]
        references["joint_attention, same tokens"] = None
        references[f"joint_attention, {repeats - 1} copies"] = expected
    best = {}
    for name, fn in variants.items():
        out = ops.convert_to_numpy(ops.cast(fn(*inputs[name]), "float32"))  # compile
        want = references[name]
        diff = float("nan") if want is None else float(np.abs(out - want).max())
        best[name] = (float("inf"), diff)
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            ops.convert_to_numpy(fn(*inputs[name]))
            seconds = time.perf_counter() - start
            best[name] = (min(best[name][0], seconds), best[name][1])
    base = best["ops.dot_product_attention"][0]
    print(f"{keras.config.backend()}, {args.dtype} q/k/v {shape}:")
    for name, (seconds, diff) in best.items():
        # "same tokens" drops the count, so no reference gives its numbers.
        shown = "n/a (other math)" if np.isnan(diff) else f"{diff:.1e}"
        print(
            f"  {name:32s} {1000 * seconds:8.1f} ms  {base / seconds:5.2f}x  "
            f"max |diff| {shown}"
        )


if __name__ == "__main__":
    main()
