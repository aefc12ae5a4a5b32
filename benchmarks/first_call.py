"""Where a first `generate` call's extra time goes, phase by phase.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    KERAS_BACKEND=tensorflow python benchmarks/first_call.py [--steps 6 2 2 6]
        [--dtype bfloat16]

In this fresh process: the import and `from_preset` times, then one line per
`generate` call (`--steps` gives each call's `num_steps`) with its total and
the time of each phase of the task: text encoding, image encoding, the
denoising loop and decoding (each waited for: its outputs are read back). A
phase that is much slower on its first call than later compiled something; a
call with a new `num_steps` that is as fast as a repeated one compiled
nothing. On tensorflow, a call that traced also lists how long each traced
function's tracing took (part of its phase's time; the rest of a first
call's extra time is the graph's first execution). `--grappler` (tensorflow)
adds each call's grappler time: the sum of the optimizer times tensorflow
logs with `TF_CPP_VMODULE=meta_optimizer=1`, read from this process's stderr.
"""

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time

START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

# The same call img2img_speed.py times: its image, prompt, guidance and steps.
from img2img_speed import LONG, SHORT, _image, generate_ours  # noqa: E402

PHASES = ("encode_text", "encode_image", "denoise", "decode")


def timed(task, name, record):
    """Replace `task.<name>` by a version that records its wall time."""
    import keras

    method = getattr(task, name)

    def run(*args, **kwargs):
        start = time.perf_counter()
        out = method(*args, **kwargs)
        for value in keras.tree.flatten(out):
            if hasattr(value, "shape"):
                keras.ops.convert_to_numpy(value)
        record[name] = time.perf_counter() - start
        return out

    setattr(task, name, run)


def time_tracing(task, traces):
    """On tensorflow, record each compiled function's tracing time by name.

    The task's compiled functions keep their `tf.function` as `__wrapped__`;
    tracing it first (`get_concrete_function`, a cache lookup once traced)
    separates the trace from the call, which then traces nothing.
    """
    function = task._function

    def traced_function(key, fn, **options):
        compiled = function(key, fn, **options)
        inner = getattr(compiled, "__wrapped__", None)
        if not hasattr(inner, "get_concrete_function"):
            return compiled

        def call(*args):
            before = inner.experimental_get_tracing_count()
            start = time.perf_counter()
            inner.get_concrete_function(*args)
            if inner.experimental_get_tracing_count() != before:
                traces[key[0]] = time.perf_counter() - start
            return compiled(*args)

        return call

    task._function = traced_function


class GrapplerLog:
    """Collects tensorflow's grappler log lines (stderr, fd 2) during a block."""

    TIME = re.compile(r"meta_optimizer.*: Graph size after: .* time = ([0-9.]+)ms")

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile(mode="w+")
        os.dup2(self.file.fileno(), 2)
        self.runs, self.seconds = 0, 0.0
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        for line in self.file:
            match = self.TIME.search(line)
            if match:
                self.runs += 1
                self.seconds += float(match.group(1)) / 1000
            else:
                sys.stderr.write(line)
        self.file.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/kd-speed-bench/ours_154")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[LONG, SHORT, SHORT, LONG]
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--grappler", action="store_true", help="time grappler (tensorflow)"
    )
    args = parser.parse_args()
    if args.grappler:  # read when tensorflow loads
        os.environ["TF_CPP_VMODULE"] = "meta_optimizer=1"

    # The library first, as a user imports it: it brings Keras and the
    # backend (and keeps jax out of tensorflow and torch processes).
    import keras_diffusion as kd

    imported = time.perf_counter()
    import keras

    task = kd.models.ImageToImage.from_preset(args.folder, dtype=args.dtype)
    loaded = time.perf_counter()
    print(
        f"{keras.backend.backend()}: import keras_diffusion (Keras included) "
        f"{imported - START:.2f} s, from_preset {loaded - imported:.2f} s"
    )
    record, traces = {}, {}
    for name in PHASES:
        timed(task, name, record)
    time_tracing(task, traces)
    image = _image(args.size)
    for index, steps in enumerate(args.steps):
        record.clear()
        traces.clear()
        grappler = GrapplerLog() if args.grappler else contextlib.nullcontext()
        with grappler:
            start = time.perf_counter()
            generate_ours(task, image, steps)
            total = time.perf_counter() - start
        phases = ", ".join(f"{name} {record[name]:.2f}" for name in PHASES)
        print(f"call {index}: {steps} steps {total:.2f} s ({phases})")
        if traces:
            traced = ", ".join(f"{name} {value:.2f}" for name, value in traces.items())
            print(f"  traced: {traced}")
        if args.grappler:
            print(
                f"  grappler: {grappler.runs} optimizer runs, {grappler.seconds:.2f} s"
            )


if __name__ == "__main__":
    main()
