"""jax's CPU dots behind `utils/fast_ops.py: matmul_in_float32`.

    python benchmarks/jax_dot_speed.py [--hidden 384 --hidden 1536]

One block's matmuls for the `bench` config (hidden 384; `--hidden 1536` is
the `wide` config; CFG batch 2: 2,048 image tokens), jitted three ways: a
bfloat16 dot returning bfloat16 (what Keras' `Dense` and `ops.einsum` ask
for), the same dot asked for float32 results (`preferred_element_type`,
what `fast_ops.linear` and the jax attention ask for), and a float32 dot.
Median of 20 runs each, in milliseconds, interleaved.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

IMAGE_TOKENS = 2048


def median_ms(cases, runs=20):
    for fn in cases.values():  # compile, then warm up
        fn().block_until_ready()
        fn().block_until_ready()
    times = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn().block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, action="append")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}\n")
    print(
        "| hidden | op | bfloat16 -> bfloat16 ms | bfloat16 -> float32 ms "
        "| float32 ms |"
    )
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    plain = jax.jit(lambda x, w: x @ w)
    wide = jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
    for d in args.hidden or [384]:
        for name, k, n in [
            ("q/k/v", d, 3 * d),
            ("MLP in", d, 4 * d),
            ("MLP out", 4 * d, d),
        ]:
            x = rng.standard_normal((IMAGE_TOKENS, k)).astype("float32")
            w = (rng.standard_normal((k, n)) / k**0.5).astype("float32")
            xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
            xf, wf = jnp.asarray(x), jnp.asarray(w)
            ms = median_ms(
                {
                    "bfloat16": lambda x=xb, w=wb: plain(x, w),
                    "float32 results": lambda x=xb, w=wb: wide(x, w),
                    "float32": lambda x=xf, w=wf: plain(x, w),
                }
            )
            print(
                f"| {d} | {name} | {ms['bfloat16']:.2f} | "
                f"{ms['float32 results']:.2f} | {ms['float32']:.2f} |"
            )


if __name__ == "__main__":
    main()
