"""FLOPs of one MMDiT denoising step, and how close our step gets to matmul peak.

    python benchmarks/step_flops.py --config bench [--tokens 154]
        [--backend jax --backend tensorflow --backend torch] [--dtype float32]

The FLOPs are counted analytically from the configuration (`step_flops`;
multiply-adds count 2): the matmuls of the patch and context embeddings,
each block's q/k/v, attention (scores and values), output projections and
MLPs in both streams (the last block's text stream is pre-only), and the
output projection, for the classifier-free-guidance batch of 2. Norms,
softmax and element-wise work are left out; they are ~1% of the count.
Of the context's 77 CLIP tokens and T5's zeros (these models have no T5),
our step runs the identical zeros as one token (`MMDiT`'s
`last_token_repeats`): the achieved FLOP/s counts the FLOPs it does, 78
text tokens; the count for every token (diffusers' and keras-hub's work) is
printed beside it.

The peak is measured in the same run: the best of several large square
matmuls (n = 2048 and 4096), in numpy and in each backend, float32 and
bfloat16. Our step time is `(T(6 steps) - T(2 steps)) / 4` on warm
`generate` calls (as in `img2img_speed.py`), so it includes the scheduler.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import speed_models  # noqa: E402

SLOW_GFLOPS = 5.0
CLIP_TOKENS = 77  # the rest of the context is T5's zeros


def step_flops(config, context_tokens, batch=2):
    """Matmul FLOPs of one guided MMDiT step for a `speed_models` config."""
    values = speed_models.spec(config)
    d = values["mmdit_hidden_dim"]
    layers = values["mmdit_num_layers"]
    patch, channels = 2, 16
    n = (values["size"] // 8 // patch) ** 2  # image tokens
    c = context_tokens
    flops = 2 * n * (patch * patch * channels) * d  # patch embedding
    flops += 2 * c * 4096 * d  # context embedding
    for index in range(layers):
        last = index == layers - 1  # text stream is pre-only: no outputs
        queries = n if last else n + c
        flops += 2 * (n + c) * d * 3 * d  # q, k, v of both streams
        flops += 2 * 2 * queries * (n + c) * d  # scores and weighted values
        flops += 2 * queries * d * d  # attention output projections
        flops += 2 * 2 * (n if last else n + c) * d * 4 * d  # MLPs
    flops += 2 * n * d * patch * patch * channels  # output projection
    return batch * flops


def _best_seconds(fn, repeats=5):
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _square(backend, x):
    """A function computing `x @ x` on `backend`, synchronously."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        # Half precision: XLA's fast CPU kernel is the dot with float32
        # results (`fast_ops.matmul_in_float32`); one returning bfloat16 is slower.
        result = jnp.float32 if x.dtype == jnp.bfloat16 else None
        f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=result))
        return lambda: f(x).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        f = tf.function(lambda x: tf.matmul(x, x))
        return lambda: f(x).numpy()
    if backend == "numpy":
        return lambda: x @ x
    import torch

    return lambda: torch.matmul(x, x)


def matmul_peaks(backend):
    """GFLOP/s of large square matmuls: numpy f32, backend f32 and bf16.

    A dtype whose 512-wide matmul runs below `SLOW_GFLOPS` (bfloat16 on a CPU
    without bfloat16 instructions: ~0.2 GFLOP/s) is not timed at the large
    sizes, which would take tens of minutes; its small-size figure is kept.
    """
    import keras
    import numpy as np

    peaks = {}

    def record(key, gflops):
        peaks[key] = max(peaks.get(key, 0.0), gflops)

    slow = set()
    for n in (512, 2048, 4096):
        a = np.random.default_rng(0).standard_normal((n, n)).astype("float32")
        flops = 2 * n**3
        if n > 512:
            record("numpy float32", flops / _best_seconds(_square("numpy", a)) / 1e9)
        for dtype in ("float32", "bfloat16"):
            if dtype in slow:
                continue
            x = keras.ops.convert_to_tensor(a, dtype)
            gflops = flops / _best_seconds(_square(backend, x)) / 1e9
            record(f"{backend} {dtype}", gflops)
            if n == 512 and gflops < SLOW_GFLOPS:
                slow.add(dtype)
    return peaks


def worker(config, tokens, dtype, repeats):
    import img2img_speed

    backend = os.environ["KERAS_BACKEND"]
    peaks = matmul_peaks(backend)
    folder = f"/tmp/kd-speed-{config}"
    size = speed_models.CONFIGS[config]["size"]
    run = img2img_speed._runner_ours(folder, tokens, dtype, size)
    run(img2img_speed.LONG)
    run(img2img_speed.SHORT)
    steps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(img2img_speed.LONG)
        t1 = time.perf_counter()
        run(img2img_speed.SHORT)
        t2 = time.perf_counter()
        steps.append(
            ((t1 - t0) - (t2 - t1)) / (img2img_speed.LONG - img2img_speed.SHORT)
        )
    print("RESULT " + json.dumps({"peaks": peaks, "step_s": min(steps)}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="bench", choices=sorted(speed_models.CONFIGS)
    )
    parser.add_argument("--tokens", type=int, default=154, choices=(154, 333))
    parser.add_argument("--backend", action="append")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.tokens, args.dtype, args.repeats)
        return
    speed_models.prepare(args.config, f"/tmp/kd-speed-{args.config}", None)
    flops = step_flops(args.config, CLIP_TOKENS + 1)
    full = step_flops(args.config, args.tokens)
    print(f"{args.config}, {args.tokens} context tokens, CFG batch 2, {args.dtype}:")
    print(
        f"one step = {flops:.3e} FLOPs done (matmuls, analytical; "
        f"{full:.3e} with every zero token)\n"
    )
    print(
        "| backend | s/step | GFLOP/s | % of backend peak | % of numpy f32 peak "
        "| peaks GFLOP/s |"
    )
    print("|---|---|---|---|---|---|")
    for backend in args.backend or ["jax", "tensorflow", "torch"]:
        command = [sys.executable, os.path.abspath(__file__), "--worker"]
        command += ["--config", args.config, "--tokens", str(args.tokens)]
        command += ["--dtype", args.dtype, "--repeats", str(args.repeats)]
        env = dict(os.environ, KERAS_BACKEND=backend)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(f"| {backend} | failed: {done.stderr[-300:]!r} |")
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        peaks, step = result["peaks"], result["step_s"]
        achieved = flops / step / 1e9
        peak = peaks[f"{backend} {args.dtype}"]
        listed = ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        print(
            f"| {backend} | {step:.3f} | {achieved:.0f} | {100 * achieved / peak:.0f}% "
            f"| {100 * achieved / peaks['numpy float32']:.0f}% | {listed} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
