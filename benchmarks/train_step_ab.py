"""`fit` without T5: the zero T5 tail as one token, against the whole context.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    KERAS_BACKEND=jax python benchmarks/train_step_ab.py [--runs 6] [--steps 3]

Two copies of the `bench` model without T5 (`ours_333`: 77 CLIP tokens and
256 zeros in T5's place), in one process: one trains as `fit` does, on the
zeros as one token counted 256 times (`StableDiffusion3Backbone.
collapse_context`); the other is handed the whole 333-token context, as
before that change. Both train on the same `precompute`d batch of two
512x512 images (no encoders in the step) with SGD, one compiled train step
each. Each run times `--steps` steps of one, then of the other, alternating,
so that the machine's drift hits both alike. Prints seconds per train step
(median and minimum over the runs) and the median of the per-run ratios.
`tests/test_fine_tuning.py` checks that both give the same update.
`--inter-op-threads N` (tensorflow) sets tensorflow's inter-op thread pool
first: on 2 cores its default lets independent ops of the whole-context
train step run side by side, contending for the cores.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


def _task(preset, whole_context):
    import keras

    import keras_diffusion as kd

    task = kd.models.ImageToImage.from_preset(preset, seed=0)
    if whole_context:
        # This copy's backbone hands every context back whole.
        task.backbone.collapse_context = lambda context, t5_ran: (context, 1)
    task.compile(optimizer=keras.optimizers.SGD(1e-4))
    return task


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/kd-speed-bench")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--inter-op-threads", type=int, help="tensorflow only")
    args = parser.parse_args()
    if args.inter_op_threads:
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)

    import keras
    import numpy as np

    preset = os.path.join(args.folder, "ours_333")
    tasks = {"one token": _task(preset, False), "whole": _task(preset, True)}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 512, 512, 3), dtype="uint8")
    prompts = ["a red circle on a blue background", "a blue square"]
    cache = tasks["one token"].precompute({"images": images, "prompts": prompts})
    batches = {k: np.concatenate([v] * args.steps) for k, v in cache.items()}
    print(
        f"{keras.backend.backend()}: context {cache['context'].shape[1]} tokens, "
        f"{args.steps} steps of batch 2 per timed call"
    )

    def fit(task):
        start = time.perf_counter()
        task.fit(batches, batch_size=2, epochs=1, shuffle=False, verbose=0)
        return (time.perf_counter() - start) / args.steps

    for task in tasks.values():  # compiles the train step
        fit(task)
    times = {name: [] for name in tasks}
    for _ in range(args.runs):
        for name, task in tasks.items():
            times[name].append(fit(task))
    for name, values in times.items():
        print(
            f"{name:>9}: {statistics.median(values):.3f} s/step (min {min(values):.3f})"
        )
    ratios = [a / b for a, b in zip(times["one token"], times["whole"], strict=True)]
    print(f"one token / whole, median of runs: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
