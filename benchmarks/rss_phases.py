"""Peak resident memory of one img2img call, phase by phase.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    python benchmarks/rss_phases.py [--system ours|diffusers] [--dtype bfloat16]
        [--backend jax|tensorflow|torch]

A sampling thread reads the process's resident set every 2 ms. For ours it
records the peak within each phase of the task (text encoding, image
encoding, the denoising loop, decoding) over a 2-step and a 6-step call;
for diffusers, whose pipeline is one call, the peak of the whole run. Run
with `MALLOC_MMAP_THRESHOLD_=131072` to see how much of a peak is glibc
keeping freed heap memory.
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
    args = parser.parse_args()
    if args.system == "diffusers" and args.backend != "torch":
        parser.error("--system diffusers runs on torch only")

    phase, peaks = ["import"], {}

    def sample():
        while True:
            now = resident_bytes()
            peaks[phase[0]] = max(peaks.get(phase[0], 0), now)
            time.sleep(0.002)

    threading.Thread(target=sample, daemon=True).start()
    import img2img_speed

    if args.system == "diffusers":
        import diffusers  # noqa: F401
    else:
        import keras_diffusion  # noqa: F401
    phase[0] = "load"
    if args.system == "diffusers":
        run = img2img_speed._runner_diffusers(args.folder, 154, args.dtype, 512)
        phase[0] = "calls"
    else:
        import keras

        import keras_diffusion as kd

        preset = os.path.join(args.folder, "ours_154")
        task = kd.models.ImageToImage.from_preset(preset, dtype=args.dtype)
        for name in PHASES:
            method = getattr(task, name)

            def timed(*a, _method=method, _name=name, **k):
                phase[0] = _name
                out = _method(*a, **k)
                keras.ops.convert_to_numpy(
                    out["context"] if _name == PHASES[0] else out
                )
                phase[0] = "between phases"
                return out

            setattr(task, name, timed)
        image = img2img_speed._image(512)

        def run(steps):
            task.generate(
                {"images": image, "prompts": img2img_speed.PROMPT},
                num_steps=steps,
                guidance_scale=img2img_speed.GUIDANCE,
                strength=1.0,
                seed=0,
                verbose=False,
            )

    run(2)
    run(6)
    time.sleep(0.05)
    listed = ", ".join(f"{name} {value / 1e9:.3f}" for name, value in peaks.items())
    label = f"{args.system}, {args.backend}, {args.dtype}"
    print(f"{label}: peak RSS GB by phase: {listed}")


if __name__ == "__main__":
    main()
