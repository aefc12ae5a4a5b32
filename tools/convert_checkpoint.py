"""Convert a checkpoint into a keras_diffusion task preset.

    python tools/convert_checkpoint.py SOURCE OUTPUT [--dtype bfloat16]

SOURCE is anything `ImageToImage.from_preset` accepts: a diffusers SD3 /
SD3.5 folder (with `model_index.json`), a Stability single-file checkpoint
(`sd3.5_medium.safetensors`, or the folder holding it; see
`keras_diffusion.converters.stability_single_file`), a keras_diffusion
preset folder, a built-in preset name, or a `kaggle://` / `hf://` handle.
OUTPUT receives a task preset (config.json, task.json, preprocessor.json,
metadata.json, model.safetensors, assets/), written atomically: a failed
conversion leaves no partial OUTPUT, and an existing preset there is only
replaced once the new one is complete. `--dtype` sets the dtype policy the
weights are stored and later loaded with (e.g. bfloat16 halves the file).

The conversion is `ImageToImage.from_preset(SOURCE).save_to_preset(OUTPUT)`,
printing a line per component as its weights are converted (diffusers
folders and single files), then a summary of every component.

Examples:

>>> import tempfile
>>> output = os.path.join(tempfile.mkdtemp(), "preset")
>>> main(["sd3_tiny_demo", output, "--quiet"])
0
>>> sorted(os.listdir(output))  # doctest: +NORMALIZE_WHITESPACE
['assets', 'config.json', 'metadata.json', 'model.safetensors',
 'preprocessor.json', 'task.json']
"""

import argparse
import os
import sys
import time

try:
    import keras_diffusion  # noqa: F401
except ImportError:  # a source checkout without `pip install -e .`
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(_ROOT, "src"))

# Component attributes of the backbones this tool knows how to describe;
# any other backbone is summarised as a whole.
COMPONENTS = ("clip_l", "clip_g", "t5", "mmdit", "vae")


def _parser():
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint (a diffusers SD3 folder, a Stability "
        "single-file .safetensors, or any handle `from_preset` accepts) into a "
        "keras_diffusion task preset."
    )
    parser.add_argument(
        "source", help="diffusers folder, single file, preset folder or handle"
    )
    parser.add_argument("output", help="folder to write the preset to")
    parser.add_argument(
        "--dtype",
        default=None,
        help="dtype policy of the saved model, e.g. float32, bfloat16, float16 "
        "(default: the source's)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def _count(layer):
    import numpy as np

    return int(sum(int(np.prod(v.shape)) for v in layer.weights))


def convert(source, output, dtype=None, log=print):
    """Load `source` as an `ImageToImage` task and save it as a preset.

    Args:
        source: any handle `ImageToImage.from_preset` accepts.
        output: the preset folder to write.
        dtype: optional dtype policy name for the converted model.
        log: called with each progress line.

    Returns:
        The loaded task.
    """
    from keras_diffusion.converters import diffusers_folder
    from keras_diffusion.models import ImageToImage

    start = time.perf_counter()
    log(f"Reading {source}" + (f" as {dtype}" if dtype else ""))

    def converted(component):
        log(f"  converted {component} ({time.perf_counter() - start:.1f} s)")

    kwargs = {} if dtype is None else {"dtype": dtype}
    with diffusers_folder.reporting_progress(converted):
        task = ImageToImage.from_preset(source, **kwargs)
    backbone = task.backbone
    log(f"Loaded {type(task).__name__} ({backbone.dtype_policy.name}):")
    parts = [(n, getattr(backbone, n, None)) for n in COMPONENTS]
    parts = [(n, layer) for n, layer in parts if layer is not None]
    for name, layer in parts or [("backbone", backbone)]:
        log(f"  {name}: {_count(layer):,} parameters")
    if task.preprocessor is not None:
        for name in task.preprocessor.tokenizers():
            log(f"  {name}: tokenizer")
    log(f"Writing {output}")
    task.save_to_preset(output)
    log(f"Done in {time.perf_counter() - start:.1f} s: {_count(backbone):,} parameters")
    return task


def main(argv=None):
    args = _parser().parse_args(argv)
    log = (lambda line: None) if args.quiet else print
    try:
        convert(args.source, args.output, args.dtype, log)
    except (ValueError, TypeError, OSError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
