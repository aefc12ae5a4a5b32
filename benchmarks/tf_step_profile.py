"""Where tensorflow's guided MMDiT step spends its time, by op type.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    python benchmarks/tf_step_profile.py [--rewrite-passes 1|2] [--steps 3]

Profiles `step_ab.py`'s step of ours (`bench`, 154 context tokens, the zero
tokens run once) with `tf.profiler.experimental`, then reads the trace's
XSpace and sums each op type's time on tensorflow's executor threads, per
step. Two executor threads run ops side by side, so the op times add up to
more than the wall time. `--rewrite-passes` is how many rounds of grappler's
rewrites the step is compiled with (`generate`'s denoising loop: 2).
"""

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

import step_ab  # noqa: E402


def op_times(logdir, steps):
    """{op type: ms per step} on the executor threads of the profiled trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # "scope/op_name:OpType"; "ExecutorState::Process" and the like
                # are the executor's wrappers around them.
                if ":" in name and "::" not in name:
                    totals[name.rsplit(":", 1)[1]] += event.duration_ps / 1e9 / steps
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewrite-passes", type=int, default=2, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--folder", default="/tmp/kd-speed-bench")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 64, 64, 16)).astype("float32")
    context = rng.standard_normal((2, 154, 4096)).astype("float32")
    context[:, 77:] = 0.0  # T5's place, without T5
    pooled = rng.standard_normal((2, 80)).astype("float32")
    step = step_ab.ours_step(
        args.folder, "float32", latents, context, pooled, 77, args.rewrite_passes
    )
    for _ in range(3):
        np.asarray(step())
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(args.steps):
            np.asarray(step())
        seconds = (time.perf_counter() - start) / args.steps
        tf.profiler.experimental.stop()
        totals = op_times(logdir, args.steps)
    total = sum(totals.values())
    print(
        f"tensorflow step, {args.rewrite_passes} rewrite round(s): {seconds:.3f} s "
        f"(profiled); op time {total:.0f} ms per step"
    )
    for op, ms in totals.most_common(args.rows):
        print(f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {op}")


if __name__ == "__main__":
    main()
