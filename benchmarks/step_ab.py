"""One guided MMDiT step alone, ours against an anchor, interleaved.

    python benchmarks/img2img_speed.py --config bench   # prepares the models once
    KERAS_BACKEND=torch python benchmarks/step_ab.py [--dtype bfloat16] [--runs 12]
    KERAS_BACKEND=tensorflow python benchmarks/step_ab.py --against keras_hub
    KERAS_BACKEND=jax python benchmarks/step_ab.py --against none --dtype bfloat16

All transformers hold the same weights (`speed_models.py`). Each run times
our `guided_velocity` (batch 2: the CFG halves, text context embedded once,
as the sampling loop does), compiled as `generate` compiles its loop
(`utils.backend.compile_function`, two rounds of grappler's rewrites on
tensorflow: one leaves some GELUs unfused), and then the anchor's step on the same
inputs plus the guidance combination, back to back, so that the machine's
drift hits both alike. Anchors: diffusers' `SD3Transformer2DModel` (torch
backend only) and keras-hub 0.32's MMDiT (any backend; `--site` is a folder
holding keras_hub, compiled the same way as ours); `--against none` times
ours alone (any backend and dtype). Prints the medians,
minima and the median of the per-run ratios. No VAE, scheduler or loop: the
step's own cost. `--overhead` runs the same weights on 16 image tokens and 4
text tokens instead of 1,024 and 154: what is left is the step's fixed cost
(per-op dispatch, and the modulation matmuls, which read all their weights
for a batch of 2).

The context is what a model without T5 gets: 77 CLIP tokens, then 77 zeros
in T5's place. Ours runs the zeros as one token counted 77 times, as
`generate` does (`MMDiT`'s `last_token_repeats`); `--full-context` passes
all 154 instead, which measures the step without that saving.
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
SIGMA = 0.7


def diffusers_step(folder, dtype, latents, context, pooled):
    import torch
    from diffusers import SD3Transformer2DModel

    dtype = getattr(torch, dtype)
    transformer = SD3Transformer2DModel.from_pretrained(
        os.path.join(folder, "diffusers", "transformer")
    )
    transformer = transformer.eval().to(dtype)
    hidden = torch.from_numpy(latents).permute(0, 3, 1, 2).repeat(2, 1, 1, 1)
    hidden, text = hidden.to(dtype), torch.from_numpy(context).to(dtype)
    pooled = torch.from_numpy(pooled).to(dtype)
    timestep = torch.tensor([1000 * SIGMA] * 2)

    def step():
        with torch.no_grad():
            v = transformer(
                hidden_states=hidden,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=timestep,
                return_dict=False,
            )[0]
            negative, positive = v.chunk(2)
            return negative + GUIDANCE * (positive - negative)

    return step


def keras_hub_step(folder, dtype, latents, context, pooled):
    import keras_hub
    import numpy as np
    from keras import ops

    from keras_diffusion.utils.backend import compile_function

    backbone = keras_hub.models.StableDiffusion3ImageToImage.from_preset(
        os.path.join(folder, "keras_hub"), dtype=dtype
    ).backbone

    def fn(latents, context, pooled, timestep, guidance):
        v = backbone.diffuser(
            {
                "latent": ops.concatenate([latents, latents], axis=0),
                "context": context,
                "pooled_projection": pooled,
                "timestep": timestep,
            },
            training=False,
        )
        return backbone.cfg(v, guidance)

    compiled = compile_function(fn, backbone.variables, rewrite_passes=2)
    args = [
        ops.convert_to_tensor(latents),
        ops.convert_to_tensor(context),
        ops.convert_to_tensor(pooled),
        ops.convert_to_tensor(np.full((2, 1), 1000 * SIGMA, "float32")),
        ops.convert_to_tensor(np.float32(GUIDANCE)),
    ]
    return lambda: compiled(*args)


def ours_step(folder, dtype, latents, context, pooled, zero_tokens=0, rewrite_passes=2):
    import numpy as np
    from keras import ops

    import keras_diffusion as kd
    from keras_diffusion.utils.backend import compile_function

    task = kd.models.ImageToImage.from_preset(
        os.path.join(folder, "ours_154"), dtype=dtype
    )
    backbone = task.backbone
    repeats = max(zero_tokens, 1)
    context = context[:, : context.shape[1] - repeats + 1]
    embed = compile_function(backbone.mmdit.embed_context, backbone.variables)
    tokens = embed(ops.convert_to_tensor(context, backbone.compute_dtype))
    options = dict(context_embedded=True, last_token_repeats=repeats)

    def fn(x, tokens, pooled, sigma, guidance):
        return backbone.guided_velocity(
            x, tokens, pooled, sigma, guidance, True, **options
        )

    compiled = compile_function(fn, backbone.variables, rewrite_passes=rewrite_passes)
    args = [
        ops.convert_to_tensor(latents),
        tokens,
        ops.convert_to_tensor(pooled, backbone.compute_dtype),
        ops.convert_to_tensor(np.float32(SIGMA)),
        ops.convert_to_tensor(np.float32(GUIDANCE)),
    ]
    return lambda: compiled(*args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--against", default="diffusers", choices=("diffusers", "keras_hub", "none")
    )
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--folder", default="/tmp/kd-speed-bench")
    parser.add_argument("--site", default="/tmp/kh/site", help="folder with keras_hub")
    parser.add_argument("--overhead", action="store_true", help="tiny inputs")
    parser.add_argument(
        "--full-context", action="store_true", help="ours runs every zero token"
    )
    args = parser.parse_args()

    import keras
    import numpy as np

    backend = keras.backend.backend()
    if args.against == "diffusers" and backend != "torch":
        parser.error("diffusers runs on torch: use KERAS_BACKEND=torch")
    if args.against == "keras_hub":
        if args.dtype != "float32":
            parser.error("keras-hub's SD3 runs in float32 only")
        sys.path.insert(1, args.site)

    rng = np.random.default_rng(0)
    side, tokens = (8, 4) if args.overhead else (64, 154)
    latents = rng.standard_normal((1, side, side, 16)).astype("float32")
    context = rng.standard_normal((2, tokens, 4096)).astype("float32")
    context[:, tokens // 2 :] = 0.0  # T5's place, without T5
    pooled = rng.standard_normal((2, 80)).astype("float32")
    inputs = (args.folder, args.dtype, latents, context, pooled)
    zeros = 0 if args.full_context else tokens - tokens // 2
    steps = {"ours": ours_step(*inputs, zeros)}
    if args.against != "none":
        anchor = diffusers_step if args.against == "diffusers" else keras_hub_step
        steps[args.against] = anchor(*inputs)

    def wait(out):
        keras.ops.convert_to_numpy(out)  # an asynchronous backend finishes here

    for step in list(steps.values()) * 2:  # compile, then warm up
        wait(step())
    times = {name: [] for name in steps}
    for _ in range(args.runs):
        for name, step in steps.items():
            start = time.perf_counter()
            wait(step())
            times[name].append(time.perf_counter() - start)
    ratio = ""
    if len(times) == 2:
        ratios = [a / b for a, b in zip(*times.values())]
        ratio = (
            f" | ours / {args.against}, median of runs {statistics.median(ratios):.3f}"
        )
    print(
        f"bench MMDiT step{' (overhead: tiny inputs)' if args.overhead else ''}, "
        f"{'full context' if args.full_context else 'zero tokens run once'}, "
        f"{backend}, {args.dtype}, {args.runs} interleaved runs: "
        + " | ".join(
            f"{name} median {statistics.median(t):.4f} s, min {min(t):.4f} s"
            for name, t in times.items()
        )
        + ratio
    )


if __name__ == "__main__":
    main()
