"""The VAE decoder's upsampling conv: the phase-split path against the plain one.

    KERAS_BACKEND=jax python benchmarks/upsample_speed.py [--size 256]
        [--channels 64] [--dtype bfloat16] [--repeats 7]

Times, compiled as `generate` compiles (jit / `tf.function`; torch eager),
`utils.fast_conv.upsample_conv2d` (one 2x2 convolution of the padded input
with the four phases' kernels, then an interleave) against the plain path
it replaces, `conv2d` of the 2x nearest-upsampled input, for a 3x3 "same"
`Conv2D` on a `(1, size, size, channels)` input (`bench`'s last decoder
upsample is 256 x 256 x 64). Prints the best of `--repeats` interleaved
runs of each and their max abs difference.
"""

import argparse
import os
import sys
import time

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "src"))

from keras_diffusion.utils.backend import compile_function  # noqa: E402
from keras_diffusion.utils.fast_conv import conv2d, upsample_conv2d  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    layer = keras.layers.Conv2D(
        args.channels, 3, padding="same", dtype=args.dtype, name="upsample_conv"
    )
    shape = (1, args.size, args.size, args.channels)
    layer.build(shape)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    x = ops.cast(x, args.dtype)

    def plain(x):
        return conv2d(layer, ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2))

    def phase_split(x):
        return upsample_conv2d(layer, x)

    systems = {
        "plain (conv of the upsampled input)": compile_function(plain, layer.variables),
        "phase-split (upsample_conv2d)": compile_function(phase_split, layer.variables),
    }
    outputs = [
        ops.convert_to_numpy(ops.cast(fn(x), "float32")) for fn in systems.values()
    ]
    best = dict.fromkeys(systems, float("inf"))
    for _ in range(args.repeats):
        for name, fn in systems.items():
            start = time.perf_counter()
            ops.convert_to_numpy(fn(x))
            best[name] = min(best[name], time.perf_counter() - start)
    print(
        f"{keras.config.backend()}, {args.dtype}, input {shape}: best of "
        f"{args.repeats}; max abs diff {np.abs(outputs[0] - outputs[1]).max():.2g}"
    )
    for name, seconds in best.items():
        print(f"  {name}: {seconds * 1e3:.1f} ms")
    ratio = best["phase-split (upsample_conv2d)"] / best[next(iter(systems))]
    print(f"  phase-split / plain: {ratio:.2f}x")


if __name__ == "__main__":
    main()
