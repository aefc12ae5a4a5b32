"""Peak resident memory of one img2img call, phase by phase.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    python benchmarks/rss_phases.py [--system ours|diffusers] [--dtype bfloat16]
        [--backend jax|tensorflow|torch]

A sampling thread reads the process's resident set every 2 ms. For ours it
records, for a 2-step call and then a 6-step call (`--steps` sets the
calls and their order), the peak within each
phase of the task (text encoding, image encoding, the denoising loop,
decoding) and, in brackets, how far that peak rose above the resident set
at the phase's start (what the phase itself added; a phase of the second
call starts from whatever the first call left resident); for diffusers,
whose pipeline is one call, the peak of the whole run. The last figure is
the process's peak. Run with `MALLOC_MMAP_THRESHOLD_=131072` to see how much
of a peak is glibc keeping freed heap memory. On tensorflow each phase
also gets the peak use of tensorflow's CPU allocator pool, in MiB
(`tf.config.experimental.get_memory_info`): with oneDNN on, the pool never
returns memory, so its regions stay resident.
"""

import argparse
import os
import sys
import threading
import time


def _backend_from_argv():
    # The backend is fixed at Keras's import, which img2img_speed does.
    for flag, value in zip(sys.argv, sys.argv[1:]):
        if flag == "--backend":
            return value
    return "torch"


os.environ["KERAS_BACKEND"] = _backend_from_argv()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

PHASES = ("encode_text", "encode_image", "denoise", "decode")


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="ours", choices=("ours", "diffusers"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--folder", default="/tmp/kd-speed-bench")
    parser.add_argument(
        "--backend", default="torch", choices=("jax", "tensorflow", "torch")
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[2, 6], help="num_steps per call"
    )
    args = parser.parse_args()
    if args.system == "diffusers" and args.backend != "torch":
        parser.error("--system diffusers runs on torch only")

    # The running interval [name, start, peak]; `peaks` keeps each name's
    # largest peak and rise over its interval's start.
    interval, peaks, pool_peaks = ["import", 0, 0], {}, {}
    tensorflow = args.system == "ours" and args.backend == "tensorflow"

    def record_pool(name):
        if not tensorflow or "tensorflow" not in sys.modules:
            return
        import tensorflow as tf

        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        pool_peaks[name] = max(pool_peaks.get(name, 0), peak)
        tf.config.experimental.reset_memory_stats("CPU:0")

    def record(now):
        interval[2] = max(interval[2], now)
        name, start, peak = interval
        old_peak, old_rise = peaks.get(name, (0, 0))
        peaks[name] = (max(old_peak, peak), max(old_rise, peak - start))

    def enter(name):
        now = resident_bytes()  # the sampler may not have run since
        record(now)
        record_pool(interval[0])
        interval[:] = [name, now, now]
        record(now)

    def sample():
        while True:
            record(resident_bytes())
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    import img2img_speed

    if args.system == "diffusers":
        import diffusers  # noqa: F401
    else:
        import keras_diffusion  # noqa: F401
    enter("load")
    if args.system == "diffusers":
        run = img2img_speed._runner_diffusers(args.folder, 154, args.dtype, 512)
        enter("calls")
    else:
        import keras

        import keras_diffusion as kd

        preset = os.path.join(args.folder, "ours_154")
        task = kd.models.ImageToImage.from_preset(preset, dtype=args.dtype)
        for name in PHASES:
            method = getattr(task, name)

            def timed(*a, _method=method, _name=name, **k):
                enter(f"{call[0]} {_name}")
                out = _method(*a, **k)
                keras.ops.convert_to_numpy(
                    out["context"] if _name == PHASES[0] else out
                )
                enter(f"{call[0]} between phases")
                return out

            setattr(task, name, timed)
        image = img2img_speed._image(512)
        call, done = [""], []

        def run(steps):
            call[0] = f"call {len(done) + 1}, {steps} steps:"
            done.append(steps)
            task.generate(
                {"images": image, "prompts": img2img_speed.PROMPT},
                num_steps=steps,
                guidance_scale=img2img_speed.GUIDANCE,
                strength=1.0,
                seed=0,
                verbose=False,
            )

    for steps in args.steps:
        run(steps)
    time.sleep(0.05)
    record_pool(interval[0])
    label = f"{args.system}, {args.backend}, {args.dtype}"
    print(f"{label}: peak RSS GB by phase (rise over the phase's start):")
    for name, (peak, rise) in peaks.items():
        pool = ""
        if name in pool_peaks:
            pool = f"  pool {pool_peaks[name] / 2**20:.0f} MiB"
        print(f"  {name:36s} {peak / 1e9:.3f} (+{rise / 1e9:.3f}){pool}")
    print(f"  {'process peak':36s} {max(p for p, _ in peaks.values()) / 1e9:.3f}")


if __name__ == "__main__":
    main()
