"""Build `tests/fixtures/keras_hub_sd3_tiny/` with keras-hub itself.

The fixture is a keras-hub preset of a tiny random `StableDiffusion3Backbone`
(SD3.5 flavour: RMS q/k norm and one MMDiT-X dual-attention block; CLIP-L and
CLIP-G, no T5, as keras-hub's own SD3 presets) with its preprocessor, saved
by keras-hub's `save_to_preset`. Next to it, `keras_hub_sd3_tiny_reference.npz`
holds inputs and keras-hub's `generate` output for them, with the VAE
posterior in "mode" and the initial noise replaced by the stored array, so
that our converted model can be compared with keras-hub value for value
(tests/test_keras_hub_preset.py).

The CLIP vocabulary is the real OpenAI CLIP BPE (from open_clip's merges
file) cut after its first 600 merges, which keeps the preset small while
tokenizing like CLIP: ids 0..511 are the byte symbols ("!" is id 0, the
CLIP-G pad), the end token is the largest id.

keras-hub is a dev-only dependency, needed just for this tool. It needs
`tensorflow-text` (keras-hub's BPE tokenizer) and otherwise only packages
the dev environment has (tensorflow, tokenizers, regex, rich, absl-py,
kagglehub). Install both without dependencies, into the venv or a separate
folder:

    pip install --no-deps keras-hub==0.32.0 tensorflow-text==2.21.1
    # or: pip install --target /tmp/kh/site --no-deps ... and --site /tmp/kh/site

    KERAS_BACKEND=jax python tools/make_keras_hub_fixture.py \
        [--output tests/fixtures/keras_hub_sd3_tiny] [--site DIR]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "..", "tests", "fixtures", "keras_hub_sd3_tiny")
REFERENCE_SUFFIX = "_reference.npz"  # next to the preset folder
NUM_MERGES = 600
SIZE = 64  # pixels; keras-hub's latents are always 1/8 of the image
SEED = 1234
PROMPTS = ["a red circle on a blue background", "a photo of a cat"]
NEGATIVE_PROMPTS = ["blurry", ""]
# keras-hub starts img2img at int(N * (1 - strength)), diffusers (and we) at
# int(N - N * strength); 8 steps at strength 0.75 start at step 2 in both.
NUM_STEPS = 8
STRENGTH = 0.75
GUIDANCE_SCALE = 5.0


def tiny_clip_vocabulary(folder):
    """Write `vocab.json` / `merges.txt` of CLIP cut after NUM_MERGES merges."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from sd3_fixtures import _bytes_to_unicode, real_clip_vocabulary

    _, merges = real_clip_vocabulary()
    merges = merges[:NUM_MERGES]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    os.makedirs(folder, exist_ok=True)
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocabulary, f)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path, len(vocabulary)


def randomise(model, seed):
    """Re-randomise every float weight (no zero or identity init survives)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    for variable in model.weights:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if not dtype.startswith("float"):
            continue  # the posterior sampler's seed state
        shape = tuple(variable.shape)
        name = variable.path.split("/")[-1]
        if name in ("gamma", "scale"):
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            std = 0.08 if len(shape) == 1 else min(0.08, 1.0 / np.sqrt(fan_in))
            values = std * rng.standard_normal(shape)
        variable.assign(values.astype(dtype))


# The fixture's architecture; benchmarks/ builds larger ones with the same code.
FIXTURE_SPEC = {
    "size": SIZE,
    "clip_l_width": 32,
    "clip_g_width": 48,
    "mmdit_hidden_dim": 32,
    "mmdit_num_layers": 3,
    "mmdit_num_heads": 4,
    "mmdit_position_size": 8,
    "mmdit_qk_norm": "rms_norm",
    "mmdit_dual_attention_indices": (0,),
    "vae_channels": (32, 32, 32, 32),
}


def build_task(vocab_path, merges_path, vocabulary_size, spec=None, seed=SEED):
    """A keras-hub SD3 img2img task with random weights, shaped by `spec`."""
    import keras_hub
    from keras_hub.src.models.clip.clip_preprocessor import CLIPPreprocessor
    from keras_hub.src.models.clip.clip_text_encoder import CLIPTextEncoder
    from keras_hub.src.models.clip.clip_tokenizer import CLIPTokenizer
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    def clip(width, activation, name):
        return CLIPTextEncoder(
            vocabulary_size=vocabulary_size,
            embedding_dim=width,
            hidden_dim=width,
            num_layers=2,
            num_heads=4,
            intermediate_dim=37,
            intermediate_activation=activation,
            intermediate_output_index=-2,
            max_sequence_length=77,
            name=name,
        )

    spec = {**FIXTURE_SPEC, **(spec or {})}
    channels = list(spec["vae_channels"])
    vae = VAEBackbone(
        encoder_num_filters=channels,
        encoder_num_blocks=[1, 1, 1, 1],
        decoder_num_filters=channels[::-1],
        decoder_num_blocks=[2, 2, 2, 2],
        sampler_method="sample",
        input_channels=3,
        sample_channels=32,
        output_channels=3,
        scale=1.5305,
        shift=0.0609,
    )
    backbone = keras_hub.models.StableDiffusion3Backbone(
        mmdit_patch_size=2,
        mmdit_hidden_dim=spec["mmdit_hidden_dim"],
        mmdit_num_layers=spec["mmdit_num_layers"],
        mmdit_num_heads=spec["mmdit_num_heads"],
        mmdit_position_size=spec["mmdit_position_size"],
        mmdit_qk_norm=spec["mmdit_qk_norm"],
        mmdit_dual_attention_indices=tuple(spec["mmdit_dual_attention_indices"]),
        vae=vae,
        clip_l=clip(spec["clip_l_width"], "quick_gelu", "clip_l"),
        clip_g=clip(spec["clip_g_width"], "gelu", "clip_g"),
        t5=None,
        image_shape=(spec["size"], spec["size"], 3),
    )
    randomise(backbone, seed)

    def preprocessor(pad_with_end_token):
        tokenizer = CLIPTokenizer(
            vocabulary=vocab_path,
            merges=merges_path,
            pad_with_end_token=pad_with_end_token,
        )
        return CLIPPreprocessor(tokenizer, sequence_length=77)

    preprocessor = keras_hub.models.StableDiffusion3TextToImagePreprocessor(
        clip_l_preprocessor=preprocessor(True),
        clip_g_preprocessor=preprocessor(False),
    )
    return keras_hub.models.StableDiffusion3ImageToImage(backbone, preprocessor)


def reference_outputs(task, images, noise):
    """keras-hub's `generate`, posterior in mode, initial noise injected."""
    from keras import ops
    from keras_hub.src.models import image_to_image

    task.backbone.vae.distribution_sampler.method = "mode"

    class _Random:
        @staticmethod
        def normal(shape, dtype="float32", seed=None):
            assert tuple(shape) == noise.shape, (shape, noise.shape)
            return ops.convert_to_tensor(noise, dtype)

    floats = []
    normalize = task._normalize_generate_outputs

    def keep_floats(outputs, input_is_scalar):
        floats.append(ops.convert_to_numpy(outputs[0]))
        return normalize(outputs, input_is_scalar)

    task._normalize_generate_outputs = keep_floats
    original = image_to_image.random
    image_to_image.random = _Random
    try:
        output = task.generate(
            {
                "images": images,
                "prompts": list(PROMPTS),
                "negative_prompts": list(NEGATIVE_PROMPTS),
            },
            num_steps=NUM_STEPS,
            strength=STRENGTH,
            guidance_scale=GUIDANCE_SCALE,
        )
    finally:
        image_to_image.random = original
        task._normalize_generate_outputs = normalize
    ids = task.preprocessor.generate_preprocess(list(PROMPTS))
    ids = {k: ops.convert_to_numpy(v) for k, v in ids.items()}
    return output, floats[0], ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--site", help="extra folder holding keras_hub")
    parser.add_argument(
        "--sharded-copy",
        help="also save the preset here with keras-hub's sharded weights "
        "(model.weights.json + ~1 MB shards), to check sharded loading by hand",
    )
    args = parser.parse_args()
    if args.site:
        sys.path.insert(0, args.site)
    import keras
    import numpy as np

    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(SEED)
    work = tempfile.mkdtemp(prefix="kh-fixture-")
    vocab_path, merges_path, size = tiny_clip_vocabulary(work)
    task = build_task(vocab_path, merges_path, size)
    output = os.path.abspath(args.output)
    if os.path.exists(output):
        shutil.rmtree(output)
    task.save_to_preset(output)
    if args.sharded_copy:
        task.save_to_preset(args.sharded_copy, max_shard_size=0.001)

    rng = np.random.default_rng(SEED)
    images = rng.uniform(-1, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype("float32")
    noise = rng.standard_normal((len(PROMPTS), SIZE // 8, SIZE // 8, 16))
    noise = noise.astype("float32")
    generated, generated_float, ids = reference_outputs(task, images, noise)
    np.savez_compressed(
        output + REFERENCE_SUFFIX,
        images=images,
        noise=noise,
        prompts=np.array(PROMPTS),
        negative_prompts=np.array(NEGATIVE_PROMPTS),
        num_steps=NUM_STEPS,
        strength=STRENGTH,
        guidance_scale=GUIDANCE_SCALE,
        clip_l_ids=ids["clip_l"],
        clip_g_ids=ids["clip_g"],
        generated=generated,
        generated_float=generated_float,
        backend=keras.config.backend(),
    )
    shutil.rmtree(work)
    print(f"Wrote {output} and {output + REFERENCE_SUFFIX}")


if __name__ == "__main__":
    main()
