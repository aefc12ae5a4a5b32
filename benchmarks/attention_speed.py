"""Attention on CPU: `ops.dot_product_attention` vs `utils.fast_attention.attention`.

    KERAS_BACKEND=jax python benchmarks/attention_speed.py [--tokens 1178]

Times, compiled (jax.jit / tf.function; torch eager), the attention of one
`bench` MMDiT block with guidance (batch 2, 6 heads of 64, 1,024 image plus
154 text tokens): Keras' `ops.dot_product_attention`, one plain einsum
attention, and ours (`keras_diffusion.utils.fast_attention.attention`: blocks of
queries on jax, heads-first batched matmuls on tensorflow, torch's fused
kernel on torch). Prints the best
of `--repeats` runs, interleaved, and the max abs difference to Keras' op.
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
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (2, args.tokens, args.heads, 64)
    q, k, v = (
        ops.convert_to_tensor(rng.standard_normal(shape, "float32")) for _ in "qkv"
    )
    variants = {
        "ops.dot_product_attention": compiled(ops.dot_product_attention),
        "plain einsum": compiled(plain_einsum),
        "ours (fast_attention.attention)": compiled(fast_attention.attention),
    }
    reference = ops.convert_to_numpy(variants["ops.dot_product_attention"](q, k, v))
    best = {}
    for name, fn in variants.items():
        out = ops.convert_to_numpy(fn(q, k, v))  # compile
        best[name] = (float("inf"), float(np.abs(out - reference).max()))
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            ops.convert_to_numpy(fn(q, k, v))
            seconds = time.perf_counter() - start
            best[name] = (min(best[name][0], seconds), best[name][1])
    base = best["ops.dot_product_attention"][0]
    print(f"{keras.config.backend()}, q/k/v {shape}:")
    for name, (seconds, diff) in best.items():
        print(
            f"  {name:32s} {1000 * seconds:8.1f} ms  {base / seconds:5.2f}x  "
            f"max |diff| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
