"""Where a torch img2img call spends its time: ours or diffusers, by operator.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    python benchmarks/torch_profile.py [--system ours|diffusers] [--steps 6]
        [--dtype float32|bfloat16]

Uses the models `img2img_speed.py` prepared under `/tmp/kd-speed-<config>`
(same weights for both systems). After two warm-up calls it times a 2-step
and a `--steps` call, then runs the profiler over one more `--steps` call and
prints torch's operator table (self CPU time), whose shares docs/performance.md
and the closing notes quote.
"""

import argparse
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))

import img2img_speed  # noqa: E402
import speed_models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", default="ours", choices=("ours", "diffusers"))
    configs = tuple(speed_models.CONFIGS)
    parser.add_argument("--config", default="bench", choices=configs)
    parser.add_argument("--tokens", type=int, default=154)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    folder = f"/tmp/kd-speed-{args.config}"
    size = speed_models.CONFIGS[args.config]["size"]
    runner = img2img_speed.RUNNERS[args.system]
    run = runner(folder, args.tokens, args.dtype, size)
    run(args.steps)
    run(2)
    for steps in (2, args.steps):
        start = time.perf_counter()
        run(steps)
        print(f"{args.system}: {steps} steps in {time.perf_counter() - start:.2f} s")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run(args.steps)
    table = profiler.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=args.rows
    )
    print(table)


if __name__ == "__main__":
    main()
