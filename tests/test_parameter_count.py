"""Tests for `parameter_count` and the catalogue's architectures and counts.

(a) The analytic counts equal `count_params()` of our built layers (small
    configs). (b) The diffusers-comparable counts equal diffusers' and
    transformers' parameter counts at full width (reference models built on
    the meta device, so nothing is allocated), and the catalogue's numbers
    equal the reference counts extrapolated, per layer, to the full depth.
(c) The catalogue's configs are what `DiffusersFolder.backbone_config()`
    makes of the Hugging Face repositories' configs, and fit the
    constructors' signatures.
"""

import doctest
import functools
import inspect
import json
import os

import keras
import pytest

from keras_diffusion.converters.diffusers_folder import DiffusersFolder
from keras_diffusion.models.stable_diffusion_3 import parameter_count as pc
from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import CLIPTextEncoder
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (
    StableDiffusion3Backbone,
)
from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
from keras_diffusion.models.stable_diffusion_3.vae import VAE
from keras_diffusion.presets.catalogue import BUILTIN_DIR

# ------------------------------------------------ the Hugging Face configs
# The architecture keys of the repositories' config.json files.
CLIP_L = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
CLIP_G = {
    **CLIP_L,
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "intermediate_size": 5120,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
T5_XXL = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
SD35_MEDIUM_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
SD35_LARGE_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}


def _repo(transformer):
    return {
        "transformer": transformer,
        "vae": SD3_VAE,
        "text_encoder": CLIP_L,
        "text_encoder_2": CLIP_G,
        "text_encoder_3": T5_XXL,
        "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    }


HF_REPOS = {
    "stable_diffusion_3_medium": _repo(SD3_MEDIUM_TRANSFORMER),
    "stable_diffusion_3.5_medium": _repo(SD35_MEDIUM_TRANSFORMER),
    "stable_diffusion_3.5_large": _repo(SD35_LARGE_TRANSFORMER),
    "stable_diffusion_3.5_large_turbo": _repo(SD35_LARGE_TRANSFORMER),
}
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def diffusers_folder_config(repo, folder):
    """`DiffusersFolder.backbone_config()` of a weightless copy of `repo`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f)
    for name in [k for k in MODEL_INDEX if not k.startswith("_")]:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for name, config in repo.items():
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        with open(os.path.join(folder, name, file), "w") as f:
            json.dump(config, f)
    # Through JSON, as the catalogue stores it (tuples become lists).
    return json.loads(json.dumps(DiffusersFolder(folder).backbone_config()))


with open(os.path.join(BUILTIN_DIR, "catalogue.json"), encoding="utf-8") as _f:
    CATALOGUE = json.load(_f)


def _config(name):
    entry = CATALOGUE[name]
    if "config" in entry:
        return entry["config"]
    with open(os.path.join(BUILTIN_DIR, entry["path"], "config.json")) as f:
        return json.load(f)["config"]


# ------------------------------------------- (a) analytic == count_params()
def _count(layer, *shapes):
    layer.build(*shapes)
    return layer.count_params()


CLIP_SMALL = dict(
    embedding_dim=16, num_layers=2, num_heads=2, intermediate_dim=24,
    intermediate_activation="gelu", projection_dim=12, vocabulary_size=50,
    max_sequence_length=9,
)  # fmt: skip
T5_SMALL = dict(
    vocabulary_size=40, hidden_dim=16, num_layers=2, num_heads=3,
    key_value_dim=5, intermediate_dim=20, relative_attention_num_buckets=8,
)  # fmt: skip
MMDIT_SMALL = dict(
    hidden_dim=16, num_layers=3, num_heads=2, position_size=5, patch_size=1,
    latent_channels=4, context_dim=10, pooled_dim=7, mlp_ratio=2,
)  # fmt: skip


def test_clip_and_t5_counts_match_built_layers():
    for config in (CLIP_SMALL, {**CLIP_SMALL, "num_layers": 1}):
        encoder = CLIPTextEncoder(**config)
        assert pc.clip_text_encoder_parameters(config) == _count(encoder, (None, 9))
    encoder = T5Encoder(**T5_SMALL)
    assert pc.t5_encoder_parameters(T5_SMALL) == _count(encoder, (None, 6))


@pytest.mark.parametrize(
    "extra",
    [{}, {"qk_norm": "rms_norm"}, {"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}],
)
def test_mmdit_counts_match_built_layers(extra):
    config = {**MMDIT_SMALL, **extra}
    model = MMDiT(**config)
    model.build()
    assert pc.mmdit_parameters(config) == model.count_params()
    non_trainable = sum(int(keras.ops.size(w)) for w in model.non_trainable_weights)
    assert pc.mmdit_position_table_parameters(config) == non_trainable == 5 * 5 * 16
    assert pc.mmdit_parameters(config, include_position_table=False) == sum(
        int(keras.ops.size(w)) for w in model.trainable_weights
    )


@pytest.mark.parametrize("quant", [False, True])
def test_vae_counts_match_built_layers(quant):
    config = dict(
        block_channels=(8, 16, 16), encoder_layers_per_block=1,
        decoder_layers_per_block=2, latent_channels=4, norm_groups=4,
        use_quant_conv=quant, use_post_quant_conv=quant,
    )  # fmt: skip
    assert pc.vae_parameters(config) == _count(VAE(**config))


def test_backbone_counts_match_built_backbone():
    config = dict(_config("sd3_tiny_demo"), t5=T5_SMALL | {"hidden_dim": 64})
    config["t5"]["num_heads"], config["t5"]["key_value_dim"] = 4, 16
    for cfg in (_config("sd3_tiny_demo"), config):
        cfg = {k: v for k, v in cfg.items() if k not in ("dtype", "name", "trainable")}
        counts = pc.backbone_parameters(cfg)
        backbone = StableDiffusion3Backbone(**cfg)
        assert counts["total"] == backbone.count_params()
        for name in ("clip_l", "clip_g", "t5", "mmdit", "vae"):
            if name in counts:
                assert counts[name] == getattr(backbone, name).count_params()
    assert "t5" in counts and counts["total_without_t5"] == counts["total"] - counts["t5"]


def test_unknown_or_missing_arguments_fail():
    with pytest.raises(ValueError, match="takes no argument"):
        pc.vae_parameters({"block_channels": [8], "layers_per_block": 2})
    with pytest.raises(ValueError, match="lacks required"):
        pc.mmdit_parameters({"hidden_dim": 8})


def test_docstring_examples_run():
    result = doctest.testmod(pc)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------- (b) against diffusers / transformers
def _reference(kind, config_json, **overrides):
    """`(parameters, buffer)` of a reference model built on the meta device.

    `buffer` is the numel of diffusers' `pos_embed.pos_embed` (0 elsewhere).
    """
    return _reference_cached(kind, config_json, json.dumps(overrides, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _reference_cached(kind, config_json, overrides_json):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    config = {**json.loads(config_json), **json.loads(overrides_json)}
    with torch.device("meta"):
        if kind == "transformer":
            model = diffusers.SD3Transformer2DModel(**config)
        elif kind == "vae":
            config.pop("shift_factor", None) if False else None
            model = diffusers.AutoencoderKL(
                **{k: v for k, v in config.items() if k != "sample_size"}
            )
        elif kind == "clip":
            model = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**config)
            )
        else:
            model = transformers.T5EncoderModel(transformers.T5Config(**config))
    buffer = model.pos_embed.pos_embed.numel() if kind == "transformer" else 0
    return sum(p.numel() for p in model.parameters()), buffer


def _linear_in_depth(kind, config, depth_key, dual=()):
    """Reference count at full depth, from builds with 1 and 2 layers.

    `count(L) = count(1) + (L - 1) * per_layer (+ the dual-attention extra
    per MMDiT-X block)`; the last MMDiT block (context-pre-only) is in
    `count(1)`, so every added layer is a full one.
    """
    text = json.dumps(config, sort_keys=True)
    one, buffer = _reference(kind, text, **{depth_key: 1})
    two, _ = _reference(kind, text, **{depth_key: 2})
    total = one + (config[depth_key] - 1) * (two - one)
    if dual:
        with_dual, _ = _reference(
            kind, text, **{depth_key: 2, "dual_attention_layers": [0]}
        )
        total += len(dual) * (with_dual - two)
    return total, buffer


WIDTHS = {
    "sd3_medium": SD3_MEDIUM_TRANSFORMER,
    "sd35_medium": SD35_MEDIUM_TRANSFORMER,
    "sd35_large": SD35_LARGE_TRANSFORMER,
}


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_mmdit_matches_diffusers_at_full_width(name):
    hf = WIDTHS[name]
    text = json.dumps(hf, sort_keys=True)
    for layers, dual in ((1, []), (2, []), (2, [0])):
        if dual and "dual_attention_layers" not in hf:
            continue
        overrides = {"num_layers": layers, "dual_attention_layers": dual}
        parameters, buffer = _reference("transformer", text, **overrides)
        ours = pc.mmdit_kwargs_for_test = None  # placeholder, replaced below
        from keras_diffusion.converters.diffusers_mmdit import mmdit_kwargs

        ours = mmdit_kwargs({**hf, **overrides})
        assert pc.mmdit_parameters(ours, include_position_table=False) == parameters
        assert pc.mmdit_position_table_parameters(ours) == buffer
