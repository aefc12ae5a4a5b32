"""How far bfloat16 images are from float32 ones: PSNR, per system and backend.

    python benchmarks/bf16_quality.py --config bench [--steps 10]
        [--backend jax --backend tensorflow --backend torch] [--demo]

Each (system, backend) runs in its own process and renders the same img2img
call twice, once in float32 and once in bfloat16 (weights and activations;
our norms, modulation, timestep embedding and scheduler stay float32), with
the same seed, so the same noise: strength 1.0, guidance 5.0, batch 1. The
uint8 images are compared as `PSNR = 10 log10(255^2 / MSE)`; the float32
image's standard deviation is printed beside it, since a flat image gives a
high PSNR for free. Systems: ours on each backend and diffusers (torch) on
the `bench` model of `speed_models.py`; with `--demo`, ours on the trained
demo preset too (images with real content: shapes on backgrounds).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(ROOT, "src"))

import img2img_speed  # noqa: E402
import speed_models  # noqa: E402


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def worker(system, path, size, steps):
    """Render with `img2img_speed.py`'s runners in both dtypes; print PSNR."""
    images = {}
    for dtype in ("float32", "bfloat16"):
        if system == "diffusers":
            run = img2img_speed._runner_diffusers(path, 154, dtype, size)
        else:
            run = img2img_speed._runner_ours(None, None, dtype, size, preset=path)
        image = np.asarray(run(steps))
        if image.dtype != np.uint8:  # diffusers' float output in [0, 1]
            image = np.round(np.clip(image, 0, 1) * 255).astype("uint8")
        images[dtype] = image
    full, half = images["float32"], images["bfloat16"]
    result = {"psnr": psnr(full, half), "std": float(np.std(full.astype("float64")))}
    print("RESULT " + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="bench", choices=sorted(speed_models.CONFIGS)
    )
    parser.add_argument("--backend", action="append")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.path, args.size, args.steps)
        return
    folder = f"/tmp/kd-speed-{args.config}"
    speed_models.prepare(args.config, folder, None)
    size = speed_models.CONFIGS[args.config]["size"]
    plan = [
        ("ours", backend, args.config, os.path.join(folder, "ours_154"), size)
        for backend in args.backend or ["jax", "tensorflow", "torch"]
    ]
    plan.insert(1, ("diffusers", "torch", args.config, folder, size))
    if args.demo:
        demo = os.path.join(ROOT, "presets", "sd3_tiny_demo")
        plan += [("ours", b, "demo", demo, 64) for b in args.backend or ["torch"]]
    print(
        f"{args.steps} steps, strength 1.0, guidance {img2img_speed.GUIDANCE}, seed 0\n"
    )
    print("| system | backend | model | PSNR bf16 vs f32 (dB) | f32 image std |")
    print("|---|---|---|---|---|")
    for system, backend, model, path, image_size in plan:
        command = [sys.executable, os.path.abspath(__file__), "--worker", system]
        command += ["--path", path, "--size", str(image_size)]
        command += ["--steps", str(args.steps)]
        env = dict(os.environ, KERAS_BACKEND=backend)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(
                f"| {system} | {backend} | {model} | failed: {done.stderr[-300:]!r} |"
            )
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        print(
            f"| {system} | {backend} | {model} | {result['psnr']:.1f} "
            f"| {result['std']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
