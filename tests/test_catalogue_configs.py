"""The catalogue's configs: what the Hugging Face repositories' configs make.

Each remote preset's config equals `DiffusersFolder.backbone_config()` of a
weightless folder holding its repository's `config.json` files
(`hf_repo_configs`), and every catalogue config (the embedded demo's
included) fits the constructors' signatures and the backbone's checks.
"""

import inspect

import pytest
from hf_repo_configs import (
    CATALOGUE,
    HF_REPOS,
    catalogue_config,
    diffusers_folder_config,
)

from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import CLIPTextEncoder
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (
    StableDiffusion3Backbone,
)
from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
from keras_diffusion.models.stable_diffusion_3.vae import VAE

REMOTE = sorted(name for name, entry in CATALOGUE.items() if "sources" in entry)


def test_every_remote_entry_has_a_config():
    assert sorted(HF_REPOS) == REMOTE
    assert "config" not in CATALOGUE["sd3_tiny_demo"]


@pytest.mark.parametrize("name", REMOTE)
def test_catalogue_config_is_the_diffusers_folder_config(name, tmp_path):
    assert CATALOGUE[name]["config"] == diffusers_folder_config(
        HF_REPOS[name], str(tmp_path)
    )


def _accepts(cls, config, allowed=()):
    """`cls(**config)` would bind: no unknown keys, no missing required ones."""
    signature = inspect.signature(cls.__init__)
    named = {n for n, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}
    unknown = set(config) - named - set(allowed)
    assert not unknown, f"{cls.__name__} does not take {sorted(unknown)}"
    signature.bind(None, **config)  # a missing required argument raises


def _key_tree(value):
    if isinstance(value, dict):
        return {k: _key_tree(v) for k, v in value.items()}
    return None


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_config_fits_the_constructors(name, tmp_path):
    config = catalogue_config(name)
    if name in HF_REPOS:
        folder_config = diffusers_folder_config(HF_REPOS[name], str(tmp_path))
        assert _key_tree(config) == _key_tree(folder_config)
    _accepts(StableDiffusion3Backbone, config, ("name", "dtype", "trainable"))
    for key, cls in (
        ("clip_l", CLIPTextEncoder),
        ("clip_g", CLIPTextEncoder),
        ("t5", T5Encoder),
        ("mmdit", MMDiT),
        ("vae", VAE),
    ):
        if config.get(key) is not None:
            _accepts(cls, config[key])
    # The backbone's own consistency checks, without building it.
    clip_width = config["clip_l"]["embedding_dim"] + config["clip_g"]["embedding_dim"]
    assert clip_width <= config["mmdit"]["context_dim"]
    pooled = config["clip_l"]["projection_dim"] + config["clip_g"]["projection_dim"]
    assert pooled == config["mmdit"]["pooled_dim"]
