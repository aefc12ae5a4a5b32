"""The Hugging Face SD3 repositories' configs, written out for the tests.

The architecture keys of each built-in remote preset's `config.json` files,
a weightless diffusers folder made of them (`diffusers_folder_config`), and
the catalogue the presets come from. `test_parameter_count.py` counts these
architectures; `test_catalogue_configs.py` checks the catalogue against them.
"""

import json
import os

from keras_diffusion.converters.diffusers_folder import DiffusersFolder
from keras_diffusion.presets.catalogue import BUILTIN_DIR

# The architecture keys of the repositories' config.json files.
CLIP_L = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "quick_gelu", "projection_dim": 768,
    "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}  # fmt: skip
CLIP_G = {
    **CLIP_L, "hidden_size": 1280, "num_hidden_layers": 32,
    "num_attention_heads": 20, "intermediate_size": 5120, "hidden_act": "gelu",
    "projection_dim": 1280,
}  # fmt: skip
T5_XXL = {
    "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
}  # fmt: skip
SD3_VAE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "latents_mean": None, "latents_std": None,
    "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}  # fmt: skip
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


def catalogue_config(name):
    """A catalogue entry's backbone config (a local preset's from its folder)."""
    entry = CATALOGUE[name]
    if "config" in entry:
        return entry["config"]
    with open(os.path.join(BUILTIN_DIR, entry["path"], "config.json")) as f:
        return json.load(f)["config"]
