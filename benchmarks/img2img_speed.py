"""img2img speed: keras_diffusion vs diffusers (torch) vs keras-hub, side by side.

    python benchmarks/img2img_speed.py --config bench [--tokens 154 --tokens 333]
        [--backend jax --backend tensorflow --backend torch] [--dtype bfloat16]
        [--rounds 2] [--repeats 2] [--site /tmp/kh/site]

`speed_models.py` builds the model once three ways with identical weights.
Each (system, backend) then runs in its own fresh process; processes
alternate between systems, `--rounds` times, so that drifts of the machine
hit every system alike. In each process, with guidance on (5.0), strength
1.0 (every step runs) and batch 1:
- *first image*: from importing the library (and with it Keras and the
  backend) through `from_preset` / `from_pretrained` to the first image (6
  steps), build and compile included; the load (import and build) alone is
  shown too, and, after the table, ours / keras-hub's round by round;
- *new num_steps*: the next call, with 2 steps (never run before);
- *s/step*: `(T(6 steps) - T(2 steps)) / 4` on warm calls, `--repeats`
  pairs per process; median, min and max over all pairs of all rounds;
- *peak RSS* of the process: the largest over the rounds, and the smallest
  (identical processes differ by up to ~0.2 GB on this machine).
Ratios are ours / anchor: against diffusers (torch) and keras-hub on the
same backend. keras-hub has no T5-free way to use more than 154 context
tokens, so its 333-token row repeats its 154-token work.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

LONG, SHORT = 6, 2
GUIDANCE = 5.0
PROMPT = "a red circle on a blue background"


def _image(size):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (size, size, 3), dtype="uint8")


def _peak_rss_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def generate_ours(task, image, steps):
    """The timed call of our task (also `first_call.py`'s): uint8 image."""
    return task.generate(
        {"images": image, "prompts": PROMPT},
        num_steps=steps,
        guidance_scale=GUIDANCE,
        strength=1.0,
        seed=0,
        verbose=False,
    )


def _runner_ours(folder, tokens, dtype, size, preset=None):
    """`run(steps)` -> uint8 image; `preset` overrides `folder/ours_<tokens>`."""
    import keras_diffusion as kd

    preset = preset or os.path.join(folder, f"ours_{tokens}")
    task = kd.models.ImageToImage.from_preset(preset, dtype=dtype)
    image = _image(size)
    return lambda steps: generate_ours(task, image, steps)


def _runner_diffusers(folder, tokens, dtype, size):
    import PIL.Image
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(
        os.path.join(folder, "diffusers"),
        text_encoder_3=None,
        tokenizer_3=None,
        torch_dtype=getattr(torch, dtype),
    )
    # Without `accelerate`, diffusers 0.42 leaves the transformer in float32
    # whatever `torch_dtype` says; cast the whole pipeline explicitly.
    pipe.to(dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(_image(size))

    def run(steps):
        return pipe(
            prompt=PROMPT,
            image=image,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            max_sequence_length=tokens - 77,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    return run


def _runner_keras_hub(folder, tokens, dtype, size):
    import keras_hub

    task = keras_hub.models.StableDiffusion3ImageToImage.from_preset(
        os.path.join(folder, "keras_hub"), dtype=dtype
    )
    image = _image(size).astype("float32") / 127.5 - 1.0  # keras-hub's range

    def run(steps):
        task.generate(
            {"images": image, "prompts": PROMPT},
            num_steps=steps,
            guidance_scale=GUIDANCE,
            strength=1.0,
            seed=0,
        )

    return run


RUNNERS = {
    "ours": _runner_ours,
    "diffusers": _runner_diffusers,
    "keras_hub": _runner_keras_hub,
}


def worker(system, folder, tokens, dtype, size, repeats):
    """Time one system in this (fresh) process; print one JSON line."""
    start = time.perf_counter()
    run = RUNNERS[system](folder, tokens, dtype, size)
    loaded = time.perf_counter()
    run(LONG)
    first = time.perf_counter()
    run(SHORT)
    second = time.perf_counter()
    per_step, warm_short = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(LONG)
        t1 = time.perf_counter()
        run(SHORT)
        t2 = time.perf_counter()
        per_step.append(((t1 - t0) - (t2 - t1)) / (LONG - SHORT))
        warm_short.append(t2 - t1)
    result = {
        "load_s": loaded - start,
        "first_image_s": first - start,
        "new_steps_s": second - first,
        "warm_short_s": min(warm_short),
        "per_step_s": per_step,
        "peak_rss": _peak_rss_bytes(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_worker(args, system, backend, tokens, folder, size):
    env = dict(os.environ, KERAS_BACKEND=backend)
    if system == "keras_hub" and args.site:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [args.site, env.get("PYTHONPATH")])
        )
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        system,
        "--folder",
        folder,
        "--tokens",
        str(tokens),
        "--dtype",
        args.dtype,
        "--size",
        str(size),
        "--repeats",
        str(args.repeats),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout)[-2000:]
    print(f"  {system}/{backend} failed:\n{tail}", file=sys.stderr)
    return None


def _merge(results):
    results = [r for r in results if r]
    if not results:
        return None
    steps = [s for r in results for s in r["per_step_s"]]
    return {
        "step_median": statistics.median(steps),
        "step_min": min(steps),
        "step_max": max(steps),
        "load": statistics.median(r["load_s"] for r in results),
        "first": statistics.median(r["first_image_s"] for r in results),
        "new_steps": statistics.median(r["new_steps_s"] for r in results),
        "warm_short": statistics.median(r["warm_short_s"] for r in results),
        "rss": max(r["peak_rss"] for r in results),
        "rss_min": min(r["peak_rss"] for r in results),
    }


def _first_image_rounds(samples):
    """Ours against keras-hub to the first image, round by round: the two
    processes of a round run back to back, so their ratio is less exposed to
    the machine's drift than the ratio of medians."""
    lines = []
    for (system, backend), ours in samples.items():
        theirs = samples.get(("keras_hub", backend))
        if system != "ours" or not theirs:
            continue
        ratios = [
            a["first_image_s"] / b["first_image_s"]
            for a, b in zip(ours, theirs)
            if a and b
        ]
        if ratios:
            listed = ", ".join(f"{r:.2f}" for r in ratios)
            lines.append(
                f"first image, ours / keras_hub on {backend}, per round: {listed} "
                f"(median {statistics.median(ratios):.2f})"
            )
    return lines


def _table(config, tokens, dtype, rows):
    lines = [
        f"### {config}, {tokens} context tokens, {dtype}",
        "",
        "| system | backend | s/step median (min-max) | vs diffusers | vs keras-hub "
        "| first image (load) s | new num_steps / warm s | peak RSS GB, max (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diffusers = rows.get(("diffusers", "torch"))
    for (system, backend), m in rows.items():
        if m is None:
            lines.append(f"| {system} | {backend} | failed | | | | | |")
            continue
        kh = rows.get(("keras_hub", backend))
        vs_d = (
            f"{m['step_median'] / diffusers['step_median']:.2f}x" if diffusers else ""
        )
        vs_k = f"{m['step_median'] / kh['step_median']:.2f}x" if kh else ""
        lines.append(
            f"| {system} | {backend} | {m['step_median']:.3f} "
            f"({m['step_min']:.3f}-{m['step_max']:.3f}) | {vs_d} | {vs_k} | "
            f"{m['first']:.1f} ({m['load']:.1f}) | "
            f"{m['new_steps']:.2f} / {m['warm_short']:.2f} | "
            f"{m['rss'] / 1e9:.2f} ({m['rss_min'] / 1e9:.2f}) |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bench")
    parser.add_argument("--tokens", type=int, action="append", choices=(154, 333))
    parser.add_argument("--backend", action="append")
    parser.add_argument("--system", action="append", choices=sorted(RUNNERS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--site", default="/tmp/kh/site", help="folder with keras_hub")
    parser.add_argument("--work", default=None, help="where the models are built")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(
            args.worker,
            args.folder,
            args.tokens[0],
            args.dtype,
            args.size,
            args.repeats,
        )
        return

    import speed_models

    folder = args.work or f"/tmp/kd-speed-{args.config}"
    site = args.site if os.path.isdir(args.site or "") else None
    args.site = site
    available = speed_models.prepare(args.config, folder, site)
    size = speed_models.CONFIGS[args.config]["size"]
    backends = args.backend or ["jax", "tensorflow", "torch"]
    wanted = args.system or ["ours", "diffusers", "keras_hub"]
    if args.dtype != "float32" and "keras_hub" in wanted:
        wanted.remove("keras_hub")  # keras-hub's SD3 is float32-only here
    plan = []
    for backend in backends:
        for system in ("ours", "keras_hub"):
            if system in wanted and system in available:
                plan.append((system, backend))
    if "diffusers" in wanted:
        plan.insert(1, ("diffusers", "torch"))
    for tokens in args.tokens or [154]:
        samples = {key: [] for key in plan}
        for round_index in range(args.rounds):
            for system, backend in plan:
                print(
                    f"round {round_index + 1}: {system} on {backend}", file=sys.stderr
                )
                samples[(system, backend)].append(
                    _run_worker(args, system, backend, tokens, folder, size)
                )
        rows = {key: _merge(values) for key, values in samples.items()}
        print(_table(args.config, tokens, args.dtype, rows), flush=True)
        print(flush=True)
        for line in _first_image_rounds(samples):
            print(line, flush=True)


if __name__ == "__main__":
    main()
