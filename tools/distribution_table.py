"""Print the weight memory per device of each catalogue preset, as Markdown.

For every preset of `presets/catalogue.json` (the demo's config is read
from its folder), the backbone is built without values and laid out with
`StableDiffusion3Backbone.get_layout_map` on each mesh; a device's bytes are
its share of the split kernels plus everything replicated. Weights only:
activations, the optimizer's state and XLA's buffers come on top.

    python tools/distribution_table.py [--mesh 1x8 --mesh 2x4] [--dtype bfloat16]
"""

import argparse
import json
import os

from keras_diffusion.models.stable_diffusion_3.distribution import (
    parameter_bytes_per_device,
)
from keras_diffusion.presets import catalogue


def preset_config(name):
    """The backbone config of a catalogue entry, or None."""
    entry = catalogue.get(name)
    if "config" in entry:
        return entry["config"]
    if entry.get("path"):
        with open(os.path.join(entry["path"], "config.json")) as f:
            return json.load(f)["config"]
    return None


def human(num_bytes):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


def count(n):
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def table(meshes=((1, 8), (2, 4)), dtype="bfloat16"):
    """The Markdown table, one row per preset, one column per mesh."""
    names = [f"{b}x{m} (batch x model)" for b, m in meshes]
    lines = [
        "| preset | parameters | whole model | " + " | ".join(names) + " |",
        "|---" * (3 + len(meshes)) + "|",
    ]
    for name in catalogue.names():
        config = preset_config(name)
        if config is None:
            continue
        per_mesh = [
            parameter_bytes_per_device(config, mesh, dtype=dtype) for mesh in meshes
        ]
        first = per_mesh[0]
        cells = [
            name,
            count(first["parameters"]),
            human(first["unsharded"]),
        ] + [human(r["total"]) for r in per_mesh]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mesh",
        action="append",
        help="BATCHxMODEL, e.g. 2x4 (repeatable; default 1x8 and 2x4)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="dtype policy")
    args = parser.parse_args()
    meshes = [tuple(int(n) for n in m.split("x")) for m in args.mesh or ("1x8", "2x4")]
    print(table(meshes, args.dtype))


if __name__ == "__main__":
    main()
