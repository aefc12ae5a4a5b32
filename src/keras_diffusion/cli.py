"""Command line: `keras-diffusion img2img --preset P --image in.png ...`."""

import argparse
import os
import sys


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-diffusion", description="Keras-native diffusion tasks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    img2img = commands.add_parser(
        "img2img", help="Transform an image with a text prompt (SD3 / SD3.5)."
    )
    img2img.add_argument(
        "--preset",
        required=True,
        help="built-in name, kaggle:// or hf:// handle, or a local preset folder",
    )
    img2img.add_argument("--image", required=True, help="input image file")
    img2img.add_argument("--prompt", required=True)
    img2img.add_argument("--negative-prompt", default=None)
    img2img.add_argument("--strength", type=float, default=None)
    img2img.add_argument("--steps", type=int, default=None)
    img2img.add_argument("--guidance", type=float, default=None)
    img2img.add_argument("--seed", type=int, default=None)
    img2img.add_argument("--height", type=int, default=None)
    img2img.add_argument("--width", type=int, default=None)
    img2img.add_argument("--dtype", default=None, help="e.g. float32, bfloat16")
    img2img.add_argument("--output", required=True, help="output .png file")
    img2img.add_argument(
        "--quiet", action="store_true", help="no progress bar over the steps"
    )
    return parser


def _img2img(args):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"--image: no such file {args.image!r}.")
    if not args.output.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise ValueError("--output must end in .png, .jpg, .jpeg or .webp.")
    try:
        image = Image.open(args.image).convert("RGB")
    except UnidentifiedImageError as e:
        raise ValueError(f"--image: {args.image!r} is not a readable image.") from e

    from keras_diffusion.models import ImageToImage

    kwargs = {} if args.dtype is None else {"dtype": args.dtype}
    task = ImageToImage.from_preset(args.preset, **kwargs)
    options = {"verbose": not args.quiet}
    if args.height is not None:
        options["height"] = args.height
    if args.width is not None:
        options["width"] = args.width
    inputs = {"images": image, "prompts": args.prompt}
    if args.negative_prompt is not None:
        inputs["negative_prompts"] = args.negative_prompt
    output = task.generate(
        inputs,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        strength=args.strength,
        seed=args.seed,
        **options,
    )
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(output).save(args.output)
    print(f"wrote {args.output} ({output.shape[1]}x{output.shape[0]})")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "img2img":
            _img2img(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"keras-diffusion: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
