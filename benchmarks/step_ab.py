"""One guided MMDiT step alone, ours (torch) against diffusers, interleaved.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    KERAS_BACKEND=torch python benchmarks/step_ab.py [--dtype bfloat16] [--runs 12]

Both transformers hold the same weights (`speed_models.py`). Each run times
our `guided_velocity` (batch 2: the CFG halves, text context embedded once,
as the sampling loop does) and then diffusers' `SD3Transformer2DModel` on
the same inputs plus the guidance combination, back to back, so that the
machine's drift hits both alike. Prints the medians, minima and the median
of the per-run ratios. No VAE, scheduler or loop: the step's own cost.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

GUIDANCE = 5.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--folder", default="/tmp/kd-speed-bench")
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import SD3Transformer2DModel
    from keras import ops

    import keras_diffusion as kd

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 64, 64, 16)).astype("float32")
    context = rng.standard_normal((2, 154, 4096)).astype("float32")
    pooled = rng.standard_normal((2, 80)).astype("float32")
    dtype = getattr(torch, args.dtype)

    task = kd.models.ImageToImage.from_preset(
        os.path.join(args.folder, "ours_154"), dtype=args.dtype
    )
    backbone = task.backbone
    transformer = SD3Transformer2DModel.from_pretrained(
        os.path.join(args.folder, "diffusers", "transformer")
    )
    transformer = transformer.eval().to(dtype)

    with torch.no_grad():
        tokens = backbone.mmdit.embed_context(
            ops.convert_to_tensor(context, backbone.compute_dtype)
        )
        x = ops.convert_to_tensor(latents)
        pooled_ours = ops.convert_to_tensor(pooled, backbone.compute_dtype)
        sigma = ops.convert_to_tensor(np.float32(0.7))
        guidance = ops.convert_to_tensor(np.float32(GUIDANCE))
        hidden = torch.from_numpy(np.concatenate([latents] * 2)).permute(0, 3, 1, 2)
        hidden, text = hidden.to(dtype), torch.from_numpy(context).to(dtype)
        pooled_theirs = torch.from_numpy(pooled).to(dtype)
        timestep = torch.tensor([700.0, 700.0])

        def ours():
            backbone.guided_velocity(
                x, tokens, pooled_ours, sigma, guidance, True, context_embedded=True
            )

        def theirs():
            v = transformer(
                hidden_states=hidden,
                encoder_hidden_states=text,
                pooled_projections=pooled_theirs,
                timestep=timestep,
                return_dict=False,
            )[0]
            negative, positive = v.chunk(2)
            return negative + GUIDANCE * (positive - negative)

        for fn in (ours, theirs, ours, theirs):
            fn()
        times = {"ours": [], "diffusers": []}
        for _ in range(args.runs):
            for name, fn in (("ours", ours), ("diffusers", theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    print(
        f"bench MMDiT step, {args.dtype}, {args.runs} interleaved runs: "
        + " | ".join(
            f"{name} median {statistics.median(t):.4f} s, min {min(t):.4f} s"
            for name, t in times.items()
        )
        + f" | ours / diffusers, median of runs {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
