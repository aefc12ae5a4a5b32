"""tensorflow's denoising loop, one step at a time against Keras' loop.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    python benchmarks/loop_ab.py [--dtype bfloat16] [--rounds 20]
        [--folder /tmp/kd-speed-wide/ours_154] [--size 512]

Loads the preset twice in one tensorflow process. One task's loop is traced
with `utils.backend.sequential_fori_loop` (what `generate` uses: a
`while_loop` with `parallel_iterations=1`), the other's with Keras'
`ops.fori_loop` (up to 10 iterations at once). Then it alternates the two,
in alternating order, timing `(T(6 steps) - T(2 steps)) / 4` as
`img2img_speed.py` does, and prints each loop's per-step median and the
median of the per-round ratios, and whether both give the same image. For
memory, run `rss_phases.py` on this commit and on the one before af05465.
"""

import argparse
import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

from img2img_speed import LONG, SHORT, _image, generate_ours  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--folder", default="/tmp/kd-speed-bench/ours_154")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    import numpy as np
    from keras import ops

    import keras_diffusion as kd
    from keras_diffusion.models.stable_diffusion_3 import (
        stable_diffusion_3_image_to_image as sd3_task,
    )

    sequential = sd3_task.sequential_fori_loop
    image = _image(args.size)
    tasks, images = {}, {}
    for name, loop in (("sequential", sequential), ("keras", ops.fori_loop)):
        sd3_task.sequential_fori_loop = loop  # read when the loop is traced
        try:
            task = kd.models.ImageToImage.from_preset(args.folder, dtype=args.dtype)
            images[name] = np.asarray(generate_ours(task, image, LONG))
            generate_ours(task, image, SHORT)
        finally:
            sd3_task.sequential_fori_loop = sequential
        tasks[name] = task
    per_step = {name: [] for name in tasks}
    order = list(tasks)
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            generate_ours(tasks[name], image, LONG)
            middle = time.perf_counter()
            generate_ours(tasks[name], image, SHORT)
            end = time.perf_counter()
            per_step[name].append(((middle - start) - (end - middle)) / (LONG - SHORT))
    for name, times in per_step.items():
        print(
            f"{name} loop: s/step median {statistics.median(times):.4f} "
            f"(min {min(times):.4f}, max {max(times):.4f})"
        )
    ratios = [s / k for s, k in zip(per_step["sequential"], per_step["keras"])]
    print(
        f"sequential / keras, median of {args.rounds} rounds: "
        f"{statistics.median(ratios):.3f}"
    )
    print("images identical:", np.array_equal(images["sequential"], images["keras"]))


if __name__ == "__main__":
    main()
