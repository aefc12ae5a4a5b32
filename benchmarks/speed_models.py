"""Build one random-weight SD3 three ways, with identical weights.

Used by `img2img_speed.py` and `step_flops.py`. keras-hub 0.32 (an optional,
benchmark-only dependency) builds and randomises the model and saves its
preset; our converter reads that preset into a keras_diffusion preset, and
the same converter's tensor views (`KerasHubPreset.weight_sources`, which
present keras-hub's weights under transformers / diffusers names) fill a
diffusers `StableDiffusion3Img2ImgPipeline`, saved with `save_pretrained`.
Without keras-hub, diffusers builds the random model and we convert its
folder; the keras-hub column is then left out.

    python benchmarks/speed_models.py --config bench --output /tmp/kd-bench
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "src"))  # a checkout without `pip install`

# MMDiT width / depth / heads, image size and VAE widths; tiny text encoders.
CONFIGS = {
    "tiny": dict(
        size=64,
        mmdit_hidden_dim=32,
        mmdit_num_layers=3,
        mmdit_num_heads=4,
        vae_channels=(32, 32, 32, 32),
    ),
    "bench": dict(
        size=512,
        mmdit_hidden_dim=384,
        mmdit_num_layers=6,
        mmdit_num_heads=6,
        vae_channels=(32, 64, 64, 64),
    ),
    "wide": dict(
        size=512,
        mmdit_hidden_dim=1536,
        mmdit_num_layers=2,
        mmdit_num_heads=24,
        vae_channels=(32, 64, 64, 64),
    ),
}


def spec(config):
    """keras-hub `build_task` spec: SD3-medium flavour (no qk-norm, no MMDiT-X)."""
    values = dict(CONFIGS[config])
    values["mmdit_position_size"] = values["size"] // 16  # latent / patch
    values["mmdit_qk_norm"] = None
    values["mmdit_dual_attention_indices"] = ()
    return values


def keras_hub_available(site=None):
    code = "import keras_hub, tensorflow_text"
    env = dict(os.environ, PYTHONPATH=site or os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def build_keras_hub(config, output, site=None):
    """keras-hub's random task for `config`, saved as a keras-hub preset."""
    if site:
        sys.path.insert(0, site)
    import keras
    import make_keras_hub_fixture as fixture

    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    vocab, merges, size = fixture.tiny_clip_vocabulary(output + "-vocab")
    task = fixture.build_task(vocab, merges, size, spec=spec(config), seed=0)
    task.save_to_preset(output)


def _clip_module(kwargs, projection_dim, vocabulary_size):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocabulary_size,
        hidden_size=kwargs["embedding_dim"],
        intermediate_size=kwargs["intermediate_dim"],
        num_hidden_layers=kwargs["num_layers"],
        num_attention_heads=kwargs["num_heads"],
        projection_dim=projection_dim,
        hidden_act=kwargs["intermediate_activation"],
        max_position_embeddings=77,
        bos_token_id=vocabulary_size - 2,
        eos_token_id=vocabulary_size - 1,
        pad_token_id=vocabulary_size - 1,
    )
    return CLIPTextModelWithProjection(config)


def _fill(module, source, what):
    import torch

    state = {name: torch.from_numpy(source.get(name).copy()) for name in source.keys()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing}, unexpected {unexpected}")
    return module.eval()


def config_kwargs(config, vocabulary_size):
    """Our backbone kwargs for `config` (as converting keras-hub's gives)."""
    values = spec(config)

    def clip(width, activation):
        return dict(
            embedding_dim=width,
            num_layers=2,
            num_heads=4,
            intermediate_dim=37,
            intermediate_activation=activation,
            projection_dim=width,
            vocabulary_size=vocabulary_size,
        )

    hidden = values["mmdit_hidden_dim"]
    return {
        "clip_l": clip(32, "quick_gelu"),
        "clip_g": clip(48, "gelu"),
        "mmdit": dict(
            hidden_dim=hidden,
            num_layers=values["mmdit_num_layers"],
            num_heads=values["mmdit_num_heads"],
            position_size=values["mmdit_position_size"],
            patch_size=2,
            latent_channels=16,
            context_dim=4096,
            pooled_dim=32 + 48,
        ),
        "vae": dict(
            block_channels=values["vae_channels"],
            encoder_layers_per_block=1,
            latent_channels=16,
            norm_groups=32,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        ),
        "scheduler_shift": 3.0,
        "height": values["size"],
    }


def build_pipeline(kwargs, vocab, merges, sources=None):
    """A diffusers SD3 img2img pipeline; weights from `sources`, else random."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
    )
    from transformers import CLIPTokenizer

    def fill(module, name):
        return _fill(module, sources[name], name) if sources else module.eval()

    clips = {}
    for name in ("clip_l", "clip_g"):
        c = kwargs[name]
        clips[name] = fill(
            _clip_module(c, c["projection_dim"], c["vocabulary_size"]), name
        )
    m, v = kwargs["mmdit"], kwargs["vae"]
    transformer = SD3Transformer2DModel(
        sample_size=kwargs["height"] // 8,
        patch_size=m["patch_size"],
        in_channels=m["latent_channels"],
        num_layers=m["num_layers"],
        attention_head_dim=m["hidden_dim"] // m["num_heads"],
        num_attention_heads=m["num_heads"],
        joint_attention_dim=m["context_dim"],
        caption_projection_dim=m["hidden_dim"],
        pooled_projection_dim=m["pooled_dim"],
        out_channels=m["latent_channels"],
        pos_embed_max_size=m["position_size"],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(v["block_channels"]),
        up_block_types=["UpDecoderBlock2D"] * len(v["block_channels"]),
        block_out_channels=tuple(v["block_channels"]),
        layers_per_block=v["encoder_layers_per_block"],
        latent_channels=v["latent_channels"],
        norm_num_groups=v["norm_groups"],
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=v["shift_factor"],
        scaling_factor=v["scaling_factor"],
    )
    return StableDiffusion3Img2ImgPipeline(
        transformer=fill(transformer, "mmdit"),
        vae=fill(vae, "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=kwargs["scheduler_shift"]),
        text_encoder=clips["clip_l"],
        tokenizer=CLIPTokenizer(vocab, merges, model_max_length=77),
        text_encoder_2=clips["clip_g"],
        tokenizer_2=CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def diffusers_from_keras_hub(keras_hub_dir, output):
    """Write keras-hub's weights as a diffusers SD3 img2img folder."""
    from keras_diffusion.converters.keras_hub_preset import KerasHubPreset

    preset = KerasHubPreset(keras_hub_dir)
    sources = preset.weight_sources(preset._weights())
    assets = os.path.join(keras_hub_dir, "assets", "tokenizer")
    vocab = os.path.join(assets, "vocabulary.json")
    merges = os.path.join(assets, "merges.txt")
    pipeline = build_pipeline(preset.kwargs, vocab, merges, sources)
    pipeline.save_pretrained(output, safe_serialization=True)


def random_diffusers(config, output):
    """Without keras-hub: diffusers' own random init, shaped like `config`."""
    import make_keras_hub_fixture as fixture
    import torch

    torch.manual_seed(0)
    vocab, merges, size = fixture.tiny_clip_vocabulary(output + "-vocab")
    pipeline = build_pipeline(config_kwargs(config, size), vocab, merges)
    pipeline.save_pretrained(output, safe_serialization=True)


def ours_from(source, output, t5_sequence_length):
    """Our preset from a keras-hub or diffusers folder (our own converter)."""
    import keras_diffusion as kd

    task = kd.models.ImageToImage.from_preset(source)
    task.save_to_preset(output)
    path = os.path.join(output, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["config"]["t5_sequence_length"] = t5_sequence_length
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def prepare(config, output, site=None):
    """Fill `output` with keras_hub/, diffusers/, ours_154/ and ours_333/.

    Returns the systems that can run ("keras_hub" only with keras-hub).
    """
    os.makedirs(output, exist_ok=True)
    done = os.path.join(output, "prepared.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)["systems"]
    systems = ["ours", "diffusers"]
    run = [sys.executable, os.path.abspath(__file__), "--config", config]
    env = dict(os.environ, KERAS_BACKEND="jax")
    kh_dir = os.path.join(output, "keras_hub")
    if keras_hub_available(site):
        systems.append("keras_hub")
        kh_env = dict(env, PYTHONPATH=site or env.get("PYTHONPATH", ""))
        subprocess.run(run + ["--step", "keras_hub", "--output", output], env=kh_env)
        if not os.path.isfile(os.path.join(kh_dir, "config.json")):
            systems.remove("keras_hub")  # keras-hub failed to build: skip it
    for step in ("diffusers", "ours"):
        subprocess.run(run + ["--step", step, "--output", output], env=env, check=True)
    with open(done, "w") as f:
        json.dump({"systems": systems, "config": config}, f)
    return systems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench")
    parser.add_argument("--output", required=True)
    parser.add_argument("--site", help="extra folder holding keras_hub")
    parser.add_argument("--step", choices=("keras_hub", "diffusers", "ours"))
    args = parser.parse_args()
    if args.step is None:
        print(prepare(args.config, args.output, args.site))
        return
    kh_dir = os.path.join(args.output, "keras_hub")
    diffusers_dir = os.path.join(args.output, "diffusers")
    if args.step == "keras_hub":
        build_keras_hub(args.config, kh_dir, args.site)
    elif args.step == "diffusers":
        if os.path.isdir(kh_dir):
            diffusers_from_keras_hub(kh_dir, diffusers_dir)
        else:
            random_diffusers(args.config, diffusers_dir)
    else:
        source = kh_dir if os.path.isdir(kh_dir) else diffusers_dir
        for tokens in (77, 256):
            target = os.path.join(args.output, f"ours_{77 + tokens}")
            shutil.rmtree(target, ignore_errors=True)
            ours_from(source, target, tokens)


if __name__ == "__main__":
    main()
