"""The architecture of the embedded demo preset `presets/sd3_tiny_demo/`.

A tiny SD3 (CLIP-L, CLIP-G, MMDiT, VAE; no T5) for 64x64 images, with a
small byte-level BPE vocabulary: the 512 byte symbols of CLIP plus whole-word
merges for the words of the demo's captions ("a red circle on a blue
background"). Any text tokenizes (unknown words fall back to bytes).

`build_task(seed)` makes it with seeded random weights (the MMDiT's position
table set to 2D sin-cos); `tools/train_demo.py` trains that and writes the
preset. Run alone, this writes the untrained model (noise-like output), to
demonstrate the pipeline without training:

    python tools/build_demo_preset.py --output ./untrained_demo
"""

import argparse
import os

import keras
import numpy as np

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
WORDS = COLOURS + SHAPES + ["a", "an", "on", "background", "with", "and", "the"]

# Tokens per prompt (CLIP's 77 would be mostly padding: the demo's captions
# are at most 9 tokens with the start and end tokens).
SEQUENCE_LENGTH = 12
CONFIG = {
    "clip_l": dict(
        embedding_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="quick_gelu",
        projection_dim=32,
        max_sequence_length=SEQUENCE_LENGTH,
    ),
    "clip_g": dict(
        embedding_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="gelu",
        projection_dim=32,
        max_sequence_length=SEQUENCE_LENGTH,
    ),
    # 64x64 images -> 16x16x16 latents -> 8x8 patches of 2x2 (4x4 patches
    # of 4x4 are cheaper but cannot draw a shape's outline).
    "mmdit": dict(
        hidden_dim=96,
        num_layers=4,
        num_heads=4,
        position_size=16,
        patch_size=2,
        latent_channels=16,
        context_dim=64,
        pooled_dim=64,
    ),
    # Downsampling by 4 (three levels): flat shapes keep sharp edges.
    "vae": dict(
        block_channels=(16, 32, 32),
        encoder_layers_per_block=1,
        decoder_layers_per_block=1,
        latent_channels=16,
        norm_groups=8,
    ),
    "t5": None,
    "t5_sequence_length": 2,
    "height": 64,
    "width": 64,
}
SAMPLING = {"num_steps": 20, "guidance_scale": 5.0, "strength": 0.8}


def byte_symbols():
    """CLIP's byte -> printable symbol table, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + len(codes) - 188)
    return [chr(c) for c in codes]


def demo_vocabulary():
    """(vocabulary, merges): bytes, bytes + </w>, whole-word merges, specials."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            if merge not in merges:
                merges.append(merge)
                tokens.append(current + piece)
            current += piece
    tokens = list(dict.fromkeys(tokens))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def sincos_table(size, dim):
    """A `(size, size, dim)` 2D sin-cos position table (SD3's kind)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    pos = np.arange(size, dtype=np.float64)[:, None] * omega  # (size, quarter)
    one_d = np.concatenate([np.sin(pos), np.cos(pos)], axis=-1)  # (size, dim/2)
    rows = np.broadcast_to(one_d[:, None], (size, size, dim // 2))
    cols = np.broadcast_to(one_d[None, :], (size, size, dim // 2))
    return np.concatenate([cols, rows], axis=-1).astype("float32")


def build_task(seed=0):
    from keras_diffusion.models import (
        CLIPTokenizer,
        StableDiffusion3Backbone,
        StableDiffusion3ImageToImage,
        StableDiffusion3Preprocessor,
    )

    keras.utils.set_random_seed(seed)
    vocabulary, merges = demo_vocabulary()
    config = dict(CONFIG)
    for name in ("clip_l", "clip_g"):
        config[name] = dict(
            config[name],
            vocabulary_size=len(vocabulary),
            end_token_id=vocabulary["<|endoftext|>"],
        )
    backbone = StableDiffusion3Backbone(**config)
    mmdit = backbone.mmdit
    mmdit.position_embedding.assign(sincos_table(mmdit.position_size, mmdit.hidden_dim))
    preprocessor = StableDiffusion3Preprocessor(
        CLIPTokenizer(vocabulary, merges, SEQUENCE_LENGTH, pad_token="<|endoftext|>"),
        CLIPTokenizer(vocabulary, merges, SEQUENCE_LENGTH, pad_token="!"),
    )
    return StableDiffusion3ImageToImage(backbone, preprocessor, sampling=SAMPLING)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument(
        "--output",
        required=True,
        help="where to write the untrained preset (the embedded one, "
        f"{os.path.join(root, 'presets', 'sd3_tiny_demo')}, is trained: see "
        "tools/train_demo.py)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = build_task(args.seed)
    task.save_to_preset(args.output)
    print(f"wrote {args.output}: {task.backbone.count_params():,} parameters")


if __name__ == "__main__":
    main()
