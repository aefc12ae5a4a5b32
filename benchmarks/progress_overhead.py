"""What the per-step progress bar and callback cost against the compiled loop.

`generate(verbose=False)` runs the whole denoising loop as one compiled
function; `verbose=True` (or a `callback`) runs a compiled single step per
loop iteration from Python so it can report progress. This prints seconds
per call for both on the embedded demo preset.

    KERAS_BACKEND=jax python benchmarks/progress_overhead.py [--steps 20]
"""

import argparse
import contextlib
import io
import statistics
import time

import keras
import numpy as np

import keras_diffusion as kd


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    task = kd.models.ImageToImage.from_preset("sd3_tiny_demo")
    image = np.full((64, 64, 3), 128, np.uint8)

    def run(verbose):
        with contextlib.redirect_stdout(io.StringIO()):
            task.generate(
                image,
                "a red circle",
                num_steps=args.steps,
                strength=1.0,
                seed=0,
                verbose=verbose,
            )

    results = {}
    for verbose in (False, True):
        run(verbose)  # compile
    for _ in range(args.repeats):  # alternate to share machine noise
        for verbose in (False, True):
            start = time.perf_counter()
            run(verbose)
            results.setdefault(verbose, []).append(time.perf_counter() - start)
    fused, stepwise = (statistics.median(results[v]) for v in (False, True))
    print(f"backend={keras.backend.backend()} steps={args.steps}")
    print(f"compiled loop (verbose=False): {fused:.3f} s/call")
    print(f"stepwise + progress bar (verbose=True): {stepwise:.3f} s/call")
    print(f"overhead: {stepwise / fused:.2f}x")


if __name__ == "__main__":
    main()
