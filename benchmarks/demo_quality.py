"""Measure the trained demo preset (`sd3_tiny_demo`), deterministically.

    KERAS_BACKEND=jax python benchmarks/demo_quality.py [--grid docs/demo_grid.png]

Every number comes from fixed seeds, with the preset's sampling defaults
(steps, guidance) unless overridden:

- judge accuracy: the pixel-rule judge of `tools/demo_shapes.py` (shape by
  the nearest template) on the generator's own ground-truth images, and on
  the same with rough outlines (`perturb_outline`); it must be ~100% on
  both to be trusted. The earlier fill-ratio rule is measured beside it;
- prompt adherence, strength 1.0 (text to image): one image for each
  (colour, shape, background) caption and seed; the share whose judged
  colours match the prompt, and whose colours and shape match (also by the
  fill-ratio rule), and the mean fit (IoU) of the prompted shape's template,
  which is ~0.99 on ground truth: how clean the outlines are;
- VAE reconstruction (encode to the posterior mean, decode) of ground
  truth: judged = input, and the template fit: the outline ceiling the
  MMDiT works under;
- layout preservation, strength 0.3: mean SSIM (gaussian window, on luma)
  between input and output, prompted with the input's own caption;
- edit success, strength 0.6: the input's caption with another shape
  colour; the share of outputs whose judged shape colour is the new one
  (and, reported too, whose shape and background are kept as well).

It writes a picture grid (inputs, then outputs at several strengths and
prompts) and prints the numbers.
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(1, os.path.join(ROOT, "src"))

import demo_shapes as shapes  # noqa: E402


# ------------------------------------------------------------------- SSIM
def _gaussian_window(size=11, sigma=1.5):
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(image, window):
    """'Valid' separable convolution of a 2D array with a 1D window."""
    n = len(window)
    rows = sum(window[i] * image[i : image.shape[0] - n + 1 + i] for i in range(n))
    return sum(window[i] * rows[:, i : rows.shape[1] - n + 1 + i] for i in range(n))


def luma(image):
    return np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])


def ssim(a, b, data_range=255.0):
    """Mean SSIM of two uint8 RGB images on luma (Wang et al. 2004)."""
    x, y = luma(a), luma(b)
    w = _gaussian_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter(x, w), _filter(y, w)
    vx = _filter(x * x, w) - mx**2
    vy = _filter(y * y, w) - my**2
    cov = _filter(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ------------------------------------------------------------- the checks
def judge_accuracy(n=600, seed=123):
    """{name: accuracy} of both judges on clean and rough ground truth."""
    images, _, labels = shapes.make_dataset(n, seed=seed)
    rng = np.random.default_rng(seed)
    rough = [shapes.perturb_outline(im, lab, rng) for im, lab in zip(images, labels)]
    results = {}
    for rule, judge in (("", shapes.judge), (", fill ratio", shapes.judge_fill_ratio)):
        for name, inputs in (("ground truth", images), ("rough outlines", rough)):
            results[f"judge accuracy ({name}{rule})"] = np.mean(
                [judge(im) == label for im, label in zip(inputs, labels)]
            )
    return results


def vae_reconstruction(task, n=300, seed=77):
    """Judged accuracy and template fit of the VAE's reconstructions."""
    from keras import ops

    images, _, labels = shapes.make_dataset(n, seed=seed)
    vae = task.backbone.vae
    mean, _ = vae.encode(images.astype("float32") / 127.5 - 1.0)
    decoded = ops.convert_to_numpy(vae.decode(mean))
    decoded = np.clip((decoded + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    details = [shapes.judge_details(im) for im in decoded]
    return {
        "VAE reconstruction: judged = input": np.mean(
            [judged == lab for (judged, _), lab in zip(details, labels)]
        ),
        "VAE reconstruction: template fit (IoU)": np.mean(
            [fits.get(lab[1], 0.0) for (_, fits), lab in zip(details, labels)]
        ),
    }


def all_captions():
    return [
        (c, s, b)
        for c, s, b in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.COLOURS)
        if c != b
    ]


def edit_label(label, rng):
    colour, shape, background = label
    others = [c for c in shapes.COLOURS if c not in (colour, background)]
    return others[rng.integers(len(others))], shape, background


def run(task, n, seed, adherence_seeds=3, **sampling):
    """The measurements and the images for the grid."""

    def generate(images, labels, strength, seed):
        prompts = [shapes.caption(*label) for label in labels]
        inputs = {"images": images, "prompts": prompts}
        return np.asarray(
            task.generate(inputs, strength=strength, seed=seed, **sampling)
        )

    results = judge_accuracy()
    results.update(vae_reconstruction(task))

    captions = all_captions()
    blank = np.full((len(captions), 64, 64, 3), 128, np.uint8)
    out = np.concatenate(
        [generate(blank, captions, 1.0, seed + k) for k in range(adherence_seeds)]
    )
    labels = captions * adherence_seeds
    details = [shapes.judge_details(im) for im in out]
    judged = [d[0] for d in details]
    colours = [j[0] == lab[0] and j[2] == lab[2] for j, lab in zip(judged, labels)]
    results["adherence s=1.0: colours"] = np.mean(colours)
    results["adherence s=1.0: shape"] = np.mean(
        [j[1] == lab[1] for j, lab in zip(judged, labels)]
    )
    results["adherence s=1.0: colours+shape"] = np.mean(
        [j == lab for j, lab in zip(judged, labels)]
    )
    results["adherence s=1.0: colours+shape, fill ratio"] = np.mean(
        [shapes.judge_fill_ratio(im) == lab for im, lab in zip(out, labels)]
    )
    results["adherence s=1.0: prompted template fit (IoU)"] = np.mean(
        [fits.get(lab[1], 0.0) for (_, fits), lab in zip(details, labels)]
    )

    images, _, originals = shapes.make_dataset(n, seed=seed + 1000)
    out = generate(images, originals, 0.3, seed)
    results["layout s=0.3: mean SSIM"] = np.mean(
        [ssim(a, b) for a, b in zip(images, out)]
    )
    results["layout s=0.3: judged = input"] = np.mean(
        [shapes.judge(im) == lab for im, lab in zip(out, originals)]
    )
    layout = out

    rng = np.random.default_rng(seed)
    edits = [edit_label(label, rng) for label in originals]
    out = generate(images, edits, 0.6, seed)
    judged = [shapes.judge(im) for im in out]
    results["edit s=0.6: new colour"] = np.mean(
        [j[0] == e[0] for j, e in zip(judged, edits)]
    )
    results["edit s=0.6: new colour, same shape+background"] = np.mean(
        [j == e for j, e in zip(judged, edits)]
    )
    edited = out
    return results, dict(
        inputs=(images, originals),
        layout=layout,
        edits=(edited, edits),
    )


def grid(task, pictures, rows, seed, **sampling):
    """Rows: input | s=0.3 own caption | s=0.6 colour edit | s=0.6 shape edit
    | s=1.0 colour edit. Upscaled 2x (nearest)."""
    images, labels = pictures["inputs"]
    images, labels = images[:rows], labels[:rows]
    edited, edits = pictures["edits"]
    shape_edits = [
        (c, shapes.SHAPES[(shapes.SHAPES.index(s) + 1) % 3], b) for c, s, b in labels
    ]
    out_shape = np.asarray(
        task.generate(
            {
                "images": images,
                "prompts": [shapes.caption(*label) for label in shape_edits],
            },
            strength=0.6,
            seed=seed,
            **sampling,
        )
    )
    out_free = np.asarray(
        task.generate(
            {"images": images, "prompts": [shapes.caption(*e) for e in edits[:rows]]},
            strength=1.0,
            seed=seed,
            **sampling,
        )
    )
    columns = [images, pictures["layout"][:rows], edited[:rows], out_shape, out_free]
    pad = 2
    tile = 64 + pad
    canvas = np.full((rows * tile + pad, len(columns) * tile + pad, 3), 255, np.uint8)
    for c, column in enumerate(columns):
        for r in range(rows):
            y, x = pad + r * tile, pad + c * tile
            canvas[y : y + 64, x : x + 64] = column[r]
    return canvas.repeat(2, axis=0).repeat(2, axis=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="sd3_tiny_demo")
    parser.add_argument("--n", type=int, default=90, help="inputs for s=0.3 and 0.6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adherence-seeds",
        type=int,
        default=3,
        help="seeds (from --seed) per caption for the strength-1.0 adherence",
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--shift", type=float, default=None, help="scheduler shift")
    parser.add_argument("--grid", default=None, help="write the picture grid here")
    parser.add_argument("--grid-rows", type=int, default=4)
    args = parser.parse_args()

    import keras_diffusion as kd

    task = kd.models.ImageToImage.from_preset(args.preset)
    if args.shift is not None:
        task.backbone.scheduler_shift = args.shift
    sampling = {"num_steps": args.steps, "guidance_scale": args.guidance}
    defaults = {**task.sampling, **{k: v for k, v in sampling.items() if v}}
    start = time.time()
    results, pictures = run(task, args.n, args.seed, args.adherence_seeds, **sampling)
    print(
        f"preset {args.preset}: steps {defaults.get('num_steps')}, guidance "
        f"{defaults.get('guidance_scale')}, shift {task.backbone.scheduler_shift}, "
        f"seed {args.seed}"
    )
    for name, value in results.items():
        print(f"  {name:48s} {value:.3f}")
    if args.grid:
        from PIL import Image

        canvas = grid(task, pictures, args.grid_rows, args.seed, **sampling)
        Image.fromarray(canvas).save(args.grid, optimize=True)
        print(f"wrote {args.grid}")
    print(f"{time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
