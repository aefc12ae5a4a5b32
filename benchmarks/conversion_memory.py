"""Peak memory of converting a large checkpoint, against the model's size.

Writes a synthetic Stability single-file SD3 checkpoint (random weights,
streamed to disk tensor by tensor): an MMDiT of width `--hidden` (1536, as
SD3 Medium) with `--layers` joint blocks and SD3's 192x192 position table,
the real SD3 VAE, and two small CLIP encoders, with CLIP tokenizer folders
(the demo preset's vocabulary) beside it. By default that is about 1.8 GB
in float32. Then, in a fresh process for each, it runs

- the conversion: `tools/convert_checkpoint.py FILE OUTPUT`, i.e. the real
  `ImageToImage.from_preset(FILE)` + `save_to_preset(OUTPUT)`;
- a baseline: a process that imports keras, the backend and the library,
  serializes one Keras object (which imports TensorFlow, when installed,
  whatever the backend) and builds nothing;

and reads each process's peak resident set size (`ru_maxrss`, from
`os.wait4`). The model's size is its parameter count (from the written
preset's metadata) times 4 bytes (the conversion loads in float32). It
prints both peaks, the model size and the ratios

    peak / model size        and        (peak - baseline) / model size.

Everything is written under a temporary folder (`--workdir`, default the
system temp folder), removed at the end; the free space is checked first.

Usage:

    KERAS_BACKEND=jax python benchmarks/conversion_memory.py \
        [--hidden 1536] [--layers 4] [--dtype float32|bfloat16] [--workdir DIR]
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")
DEMO_ASSETS = os.path.join(ROOT, "presets", "sd3_tiny_demo", "assets")
CONTEXT_DIM, TIMESTEP_DIM, LATENT, PATCH = 4096, 256, 16, 2
CLIPS = (("clip_l", 64), ("clip_g", 128))  # small encoders, 64-wide heads
VAE_CHANNELS, VAE_LAYERS = (128, 256, 512, 512), 2


def _linear(name, out, fan_in, bias=True):
    yield f"{name}.weight", (out, fan_in)
    if bias:
        yield f"{name}.bias", (out,)


def mmdit_shapes(hidden, layers, positions=192):
    """(name, shape) of a reference-named SD3 MMDiT, without the prefix."""
    d = hidden
    yield "x_embedder.proj.weight", (d, LATENT, PATCH, PATCH)
    yield "x_embedder.proj.bias", (d,)
    yield "pos_embed", (1, positions * positions, d)
    yield from _linear("t_embedder.mlp.0", d, TIMESTEP_DIM)
    yield from _linear("t_embedder.mlp.2", d, d)
    pooled = sum(width for _, width in CLIPS)
    yield from _linear("y_embedder.mlp.0", d, pooled)
    yield from _linear("y_embedder.mlp.2", d, d)
    yield from _linear("context_embedder", d, CONTEXT_DIM)
    for i in range(layers):
        for stream in ("x_block", "context_block"):
            block = f"joint_blocks.{i}.{stream}"
            last_context = stream == "context_block" and i == layers - 1
            yield from _linear(f"{block}.attn.qkv", 3 * d, d)
            chunks = 2 if last_context else 6
            yield from _linear(f"{block}.adaLN_modulation.1", chunks * d, d)
            if last_context:
                continue
            yield from _linear(f"{block}.attn.proj", d, d)
            yield from _linear(f"{block}.mlp.fc1", 4 * d, d)
            yield from _linear(f"{block}.mlp.fc2", d, 4 * d)
    yield from _linear("final_layer.linear", PATCH * PATCH * LATENT, d)
    yield from _linear("final_layer.adaLN_modulation.1", 2 * d, d)


def _conv(name, out, fan_in, size=3):
    yield f"{name}.weight", (out, fan_in, size, size)
    yield f"{name}.bias", (out,)


def _norm(name, width):
    yield f"{name}.weight", (width,)
    yield f"{name}.bias", (width,)


def _resnet(name, fan_in, out):
    yield from _norm(f"{name}.norm1", fan_in)
    yield from _conv(f"{name}.conv1", out, fan_in)
    yield from _norm(f"{name}.norm2", out)
    yield from _conv(f"{name}.conv2", out, out)
    if fan_in != out:
        yield from _conv(f"{name}.nin_shortcut", out, fan_in, 1)


def _mid(side, width):
    yield from _resnet(f"{side}.mid.block_1", width, width)
    yield from _norm(f"{side}.mid.attn_1.norm", width)
    for part in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{side}.mid.attn_1.{part}", width, width, 1)
    yield from _resnet(f"{side}.mid.block_2", width, width)


def vae_shapes():
    """(name, shape) of SD3's VAE in the LDM layout, without the prefix."""
    widths, levels = VAE_CHANNELS, len(VAE_CHANNELS)
    yield from _conv("encoder.conv_in", widths[0], 3)
    fan_in = widths[0]
    for i, width in enumerate(widths):
        for j in range(VAE_LAYERS):
            yield from _resnet(f"encoder.down.{i}.block.{j}", fan_in, width)
            fan_in = width
        if i < levels - 1:
            yield from _conv(f"encoder.down.{i}.downsample.conv", width, width)
    yield from _mid("encoder", widths[-1])
    yield from _norm("encoder.norm_out", widths[-1])
    yield from _conv("encoder.conv_out", 2 * LATENT, widths[-1])
    yield from _conv("decoder.conv_in", widths[-1], LATENT)
    yield from _mid("decoder", widths[-1])
    fan_in = widths[-1]
    for level in reversed(range(levels)):  # LDM numbers from the narrowest
        for j in range(VAE_LAYERS + 1):
            yield from _resnet(f"decoder.up.{level}.block.{j}", fan_in, widths[level])
            fan_in = widths[level]
        if level > 0:
            yield from _conv(f"decoder.up.{level}.upsample.conv", fan_in, fan_in)
    yield from _norm("decoder.norm_out", widths[0])
    yield from _conv("decoder.conv_out", 3, widths[0])


def clip_shapes(width, layers=2, vocabulary=49408):
    """(name, shape) of a small CLIP text model, transformers' names."""
    yield "text_model.embeddings.token_embedding.weight", (vocabulary, width)
    yield "text_model.embeddings.position_embedding.weight", (77, width)
    for i in range(layers):
        layer = f"text_model.encoder.layers.{i}"
        yield from _norm(f"{layer}.layer_norm1", width)
        for part in ("q", "k", "v", "out"):
            yield from _linear(f"{layer}.self_attn.{part}_proj", width, width)
        yield from _norm(f"{layer}.layer_norm2", width)
        yield from _linear(f"{layer}.mlp.fc1", 4 * width, width)
        yield from _linear(f"{layer}.mlp.fc2", width, 4 * width)
    yield from _norm("text_model.final_layer_norm", width)
    yield "text_projection.weight", (width, width)


def checkpoint_shapes(hidden, layers):
    """(name, shape) of every tensor of the synthetic single file."""
    shapes = [
        (f"model.diffusion_model.{n}", s) for n, s in mmdit_shapes(hidden, layers)
    ]
    shapes += [(f"first_stage_model.{n}", s) for n, s in vae_shapes()]
    for name, width in CLIPS:
        prefix = f"text_encoders.{name}.transformer."
        shapes += [(prefix + n, s) for n, s in clip_shapes(width)]
    return shapes


def write_checkpoint(path, shapes, dtype):
    """Stream random tensors of `shapes` to a safetensors file at `path`."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    tag = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    header, offset = {}, 0
    itemsize = np.dtype(np_dtype).itemsize
    for name, shape in shapes:
        size = int(np.prod(shape)) * itemsize
        header[name] = {
            "dtype": tag,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes:
            values = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if name.endswith("norm.weight") or ".norm" in name and "weight" in name:
                values += 1.0
            f.write(values.astype(np_dtype).tobytes())
            del values


def write_tokenizers(folder):
    """CLIP tokenizer folders (the demo preset's small vocabulary)."""
    for name, source, pad in (
        ("tokenizer", "clip_l_tokenizer", "<|endoftext|>"),
        ("tokenizer_2", "clip_g_tokenizer", "!"),
    ):
        shutil.copytree(os.path.join(DEMO_ASSETS, source), os.path.join(folder, name))
        with open(os.path.join(folder, name, "special_tokens_map.json"), "w") as f:
            json.dump({"pad_token": pad}, f)


# The peak RSS of a process started from a large one includes that parent's
# resident memory at the fork (Linux carries the old high-water mark across
# exec). So each measured command is started by this small launcher, whose
# own size is all that could leak into the figure (a few MB).
LAUNCHER = (
    "import os, subprocess, sys\n"
    "process = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(process.pid, 0)\n"
    "print('PEAK_RSS_KB', usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n"
)


def run_measured(command, env):
    """Run `command`; return (return code, peak RSS in bytes, seconds, output)."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAK")]
    if not lines:
        return 1, 0, seconds, output
    _, peak, code = lines[-1].split()
    return int(code), int(peak) * 1024, seconds, output


# What every conversion pays whatever the model's size: the imports, and the
# first Keras serialization (which imports TensorFlow lazily when it is
# installed, even on another backend: about 0.37 GB).
BASELINE = (
    "import keras, numpy\n"
    "import keras_diffusion\n"
    "from keras_diffusion.models import ImageToImage\n"
    "keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)\n"
    "keras.saving.serialize_keras_object(keras.dtype_policies.get('float32'))\n"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", default=None, help="where to write (temp)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(ROOT, "src")] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    backend = env.setdefault("KERAS_BACKEND", "jax")
    with tempfile.TemporaryDirectory(prefix="kd-memory-", dir=args.workdir) as work:
        shapes = checkpoint_shapes(args.hidden, args.layers)
        itemsize = 4 if args.dtype == "float32" else 2
        data_bytes = sum(int(np.prod(s)) for _, s in shapes) * itemsize
        free = shutil.disk_usage(work).free
        needed = data_bytes * (1 + 4 / itemsize) * 1.1  # file + float32 preset
        if free < needed:
            raise SystemExit(
                f"Not enough free space in {work}: {free / 1e9:.1f} GB free, "
                f"{needed / 1e9:.1f} GB needed."
            )
        folder = os.path.join(work, "stability")
        os.makedirs(folder)
        path = os.path.join(folder, "sd3_synthetic.safetensors")
        start = time.perf_counter()
        write_checkpoint(path, shapes, args.dtype)
        write_tokenizers(folder)
        size = os.path.getsize(path)
        print(
            f"checkpoint: {size / 1e9:.2f} GB, {len(shapes)} tensors ({args.dtype}), "
            f"MMDiT width {args.hidden}, {args.layers} blocks; written in "
            f"{time.perf_counter() - start:.0f} s"
        )
        code, baseline, seconds, output = run_measured(
            [sys.executable, "-c", BASELINE], env
        )
        if code:
            raise SystemExit(f"baseline failed:\n{output}")
        output_dir = os.path.join(work, "preset")
        code, peak, seconds, output = run_measured(
            [sys.executable, TOOL, path, output_dir], env
        )
        if code:
            raise SystemExit(f"conversion failed:\n{output}")
        with open(os.path.join(output_dir, "metadata.json")) as f:
            parameters = json.load(f)["parameter_count"]
        model = 4 * parameters  # float32
        weights = sum(
            os.path.getsize(os.path.join(output_dir, n))
            for n in os.listdir(output_dir)
            if n.startswith("model.weights")
        )
        print(f"backend: {backend}; conversion took {seconds:.0f} s")
        print(f"model: {parameters:,} parameters = {model / 1e9:.3f} GB in float32")
        print(f"  (written preset weights: {weights / 1e9:.3f} GB)")
        print(f"baseline peak RSS (imports, no model): {baseline / 1e9:.3f} GB")
        print(f"conversion peak RSS: {peak / 1e9:.3f} GB")
        print(f"ratio peak / model: {peak / model:.2f}")
        print(f"ratio (peak - baseline) / model: {(peak - baseline) / model:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
