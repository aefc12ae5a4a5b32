"""Build the small embedded demo preset `presets/sd3_tiny_demo/`.

A tiny SD3 (CLIP-L, CLIP-G, MMDiT, VAE; no T5) for 64x64 images, with a
small byte-level BPE vocabulary: the 512 byte symbols of CLIP plus whole-word
merges for the words of the demo's captions ("a red circle on a blue
background"). Any text tokenizes (unknown words fall back to bytes).

Until the fine-tuning tool trains it, its weights are random (seeded), so
its output is noise-like: it demonstrates the pipeline, not image quality.

    python tools/build_demo_preset.py [--output presets/sd3_tiny_demo]
"""

import argparse
import os

import keras

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
WORDS = COLOURS + SHAPES + ["a", "an", "on", "background", "with", "and", "the"]

CONFIG = {
    "clip_l": dict(
        embedding_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="quick_gelu",
        projection_dim=32,
    ),
    "clip_g": dict(
        embedding_dim=32,
        num_layers=2,
        num_heads=2,
        intermediate_dim=64,
        intermediate_activation="gelu",
        projection_dim=32,
    ),
    "mmdit": dict(
        hidden_dim=64,
        num_layers=3,
        num_heads=4,
        position_size=16,
        patch_size=2,
        latent_channels=16,
        context_dim=64,
        pooled_dim=64,
    ),
    "vae": dict(
        block_channels=(32, 64, 64, 64),
        encoder_layers_per_block=1,
        decoder_layers_per_block=2,
        latent_channels=16,
        norm_groups=8,
    ),
    "t5": None,
    "t5_sequence_length": 16,
    "height": 64,
    "width": 64,
}
SAMPLING = {"num_steps": 8, "guidance_scale": 4.0, "strength": 0.8}


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
    preprocessor = StableDiffusion3Preprocessor(
        CLIPTokenizer(vocabulary, merges, pad_token="<|endoftext|>"),
        CLIPTokenizer(vocabulary, merges, pad_token="!"),
    )
    return StableDiffusion3ImageToImage(backbone, preprocessor, sampling=SAMPLING)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument(
        "--output", default=os.path.join(root, "presets", "sd3_tiny_demo")
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    task = build_task(args.seed)
    task.save_to_preset(args.output)
    print(f"wrote {args.output}: {task.backbone.count_params():,} parameters")


if __name__ == "__main__":
    main()
