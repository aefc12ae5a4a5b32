"""Tests for `parameter_count` and the catalogue's architectures and counts.

(a) The analytic counts equal `count_params()` of our built layers (small
    configs). (b) The diffusers-comparable counts equal diffusers' and
    transformers' parameter counts at full width (reference models built on
    the meta device, so nothing is allocated), and the catalogue's numbers
    equal the reference counts extrapolated, per layer, to the full depth.
(c) The catalogue's parameter counts are the analytic counts of its
    configs. Its configs themselves: `test_catalogue_configs.py`.
"""

import contextlib
import doctest
import functools
import json

import keras
import numpy as np
import pytest
from hf_repo_configs import (
    CATALOGUE,
    CLIP_G,
    CLIP_L,
    HF_REPOS,
    SD3_MEDIUM_TRANSFORMER,
    SD3_VAE,
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    T5_XXL,
    catalogue_config,
)

from keras_diffusion.converters import diffusers_mmdit, diffusers_vae, transformers_text
from keras_diffusion.models.stable_diffusion_3 import parameter_count as pc
from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import CLIPTextEncoder
from keras_diffusion.models.stable_diffusion_3.mmdit import MMDiT
from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_backbone import (
    StableDiffusion3Backbone,
)
from keras_diffusion.models.stable_diffusion_3.t5_encoder import T5Encoder
from keras_diffusion.models.stable_diffusion_3.vae import VAE


# ------------------------------------------- (a) analytic == count_params()
@contextlib.contextmanager
def _shapes_only():
    """Build layers whose variables have shapes but no values.

    Variables created in a `StatelessScope` defer their initializers; with
    `initialize_variables=False` they never run (on JAX each new shape
    would compile one). `clear_session` then forgets the pending variables.
    """
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        keras.utils.clear_session()


def _size(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


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
    with _shapes_only():
        for config in (CLIP_SMALL, {**CLIP_SMALL, "num_layers": 1}):
            encoder = CLIPTextEncoder(**config)
            encoder.build((None, 9))
            assert pc.clip_text_encoder_parameters(config) == encoder.count_params()
        encoder = T5Encoder(**T5_SMALL)
        encoder.build((None, 6))
        assert pc.t5_encoder_parameters(T5_SMALL) == encoder.count_params()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"qk_norm": "rms_norm"},
        {"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]},
    ],
)
def test_mmdit_counts_match_built_layers(extra):
    config = {**MMDIT_SMALL, **extra}
    with _shapes_only():
        model = MMDiT(**config)
        model.build()
        assert pc.mmdit_parameters(config) == model.count_params()
        non_trainable = _size(model.non_trainable_weights)
        assert pc.mmdit_position_table_parameters(config) == non_trainable == 400
        without_table = pc.mmdit_parameters(config, include_position_table=False)
        assert without_table == _size(model.trainable_weights)


@pytest.mark.parametrize("quant", [False, True])
def test_vae_counts_match_built_layers(quant):
    config = dict(
        block_channels=(8, 16, 24), encoder_layers_per_block=1,
        decoder_layers_per_block=2, latent_channels=4, norm_groups=4,
        use_quant_conv=quant, use_post_quant_conv=quant,
    )  # fmt: skip
    with _shapes_only():
        vae = VAE(**config)
        vae.build()
        assert pc.vae_parameters(config) == vae.count_params()


def test_backbone_counts_match_built_backbone():
    demo = catalogue_config("sd3_tiny_demo")
    t5 = dict(T5_SMALL, hidden_dim=64, num_heads=4, key_value_dim=16)
    for config in (demo, {**demo, "t5": t5}):
        config = {k: v for k, v in config.items() if k not in ("dtype", "name")}
        counts = pc.backbone_parameters(config)
        with _shapes_only():
            backbone = StableDiffusion3Backbone(**config)
            assert counts["total"] == backbone.count_params()
            assert counts["mmdit_position_table"] == _size(
                backbone.non_trainable_weights
            )
            for name in ("clip_l", "clip_g", "t5", "mmdit", "vae"):
                if name in counts:
                    assert counts[name] == getattr(backbone, name).count_params()
    assert counts["t5"] == pc.t5_encoder_parameters(t5)
    assert counts["total_without_t5"] == counts["total"] - counts["t5"]


def test_unknown_or_missing_arguments_fail():
    with pytest.raises(ValueError, match="takes no argument"):
        pc.vae_parameters({"block_channels": [8], "layers_per_block": 2})
    with pytest.raises(ValueError, match="lacks required"):
        pc.mmdit_parameters({"hidden_dim": 8})


def test_docstring_examples_run():
    result = doctest.testmod(pc)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------- (b) against diffusers / transformers
@functools.cache
def _reference(kind, config_json, **overrides):
    """`(parameters, buffer)` of a reference model built on the meta device.

    `parameters` is `sum(p.numel() for p in model.parameters())`; `buffer`
    is the numel of diffusers' `pos_embed.pos_embed` (0 for other models).
    """
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    config = {**json.loads(config_json), **overrides}
    with torch.device("meta"):
        if kind == "transformer":
            model = diffusers.SD3Transformer2DModel(**config)
        elif kind == "vae":
            config.pop("sample_size")
            model = diffusers.AutoencoderKL(**config)
        elif kind == "clip":
            config = transformers.CLIPTextConfig(**config)
            model = transformers.CLIPTextModelWithProjection(config)
        else:
            model = transformers.T5EncoderModel(transformers.T5Config(**config))
    buffer = model.pos_embed.pos_embed.numel() if kind == "transformer" else 0
    return sum(p.numel() for p in model.parameters()), buffer


def _ours(kind, hf_config):
    if kind == "transformer":
        return pc.mmdit_parameters(
            diffusers_mmdit.mmdit_kwargs(hf_config), include_position_table=False
        )
    if kind == "vae":
        return pc.vae_parameters(diffusers_vae.vae_kwargs(hf_config))
    if kind == "clip":
        return pc.clip_text_encoder_parameters(
            transformers_text.clip_text_encoder_kwargs(hf_config)
        )
    return pc.t5_encoder_parameters(transformers_text.t5_encoder_kwargs(hf_config))


DEPTH = {"transformer": "num_layers", "clip": "num_hidden_layers", "t5": "num_layers"}
REFERENCES = {
    "sd3_medium": ("transformer", SD3_MEDIUM_TRANSFORMER),
    "sd35_medium": ("transformer", SD35_MEDIUM_TRANSFORMER),
    "sd35_large": ("transformer", SD35_LARGE_TRANSFORMER),
    "clip_l": ("clip", CLIP_L),
    "clip_g": ("clip", CLIP_G),
    "t5_xxl": ("t5", T5_XXL),
}


def _shallow(kind, hf_config):
    """The 1- and 2-layer variants (and 2 layers with dual attention)."""
    variants = [{DEPTH[kind]: 1}, {DEPTH[kind]: 2}]
    if kind == "transformer":
        variants = [{**v, "dual_attention_layers": ()} for v in variants]
        if hf_config.get("dual_attention_layers"):
            variants.append({"num_layers": 2, "dual_attention_layers": (0,)})
    return variants


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_full_width_counts_match_reference(name):
    kind, hf_config = REFERENCES[name]
    text = json.dumps(hf_config, sort_keys=True)
    for overrides in _shallow(kind, hf_config):
        parameters, buffer = _reference(kind, text, **overrides)
        assert _ours(kind, {**hf_config, **overrides}) == parameters, overrides
        if kind == "transformer":
            ours = diffusers_mmdit.mmdit_kwargs({**hf_config, **overrides})
            assert pc.mmdit_position_table_parameters(ours) == buffer


def test_full_vae_matches_diffusers():
    parameters, _ = _reference("vae", json.dumps(SD3_VAE, sort_keys=True))
    assert _ours("vae", SD3_VAE) == parameters == 83_819_683


def _reference_at_full_depth(kind, hf_config):
    """The reference count at full depth, extrapolated from 1 and 2 layers.

    A count is linear in the depth: `count(L) = count(1) + (L - 1) *
    (count(2) - count(1))`, plus, per MMDiT-X block, the difference that
    dual attention makes to a 2-layer model. (The last, context-pre-only
    MMDiT block is already in `count(1)`, so each added block is a full one.)
    Returns `(parameters, buffer)`.
    """
    text = json.dumps(hf_config, sort_keys=True)
    one, two, *dual = (
        _reference(kind, text, **overrides) for overrides in _shallow(kind, hf_config)
    )
    per_layer = two[0] - one[0]
    parameters = one[0] + (hf_config[DEPTH[kind]] - 1) * per_layer
    if dual:
        dual_layers = hf_config["dual_attention_layers"]
        parameters += len(dual_layers) * (dual[0][0] - two[0])
    return parameters, one[1]


@pytest.mark.parametrize("name", sorted(HF_REPOS))
def test_catalogue_counts_equal_extrapolated_reference(name):
    repo, counts = HF_REPOS[name], CATALOGUE[name]["parameters"]
    expected = {
        "clip_l": _reference_at_full_depth("clip", repo["text_encoder"]),
        "clip_g": _reference_at_full_depth("clip", repo["text_encoder_2"]),
        "t5": _reference_at_full_depth("t5", repo["text_encoder_3"]),
        "mmdit": _reference_at_full_depth("transformer", repo["transformer"]),
        "vae": _reference("vae", json.dumps(repo["vae"], sort_keys=True)),
    }
    # Our weights are the reference's parameters plus its pos_embed buffer.
    for component, (parameters, buffer) in expected.items():
        assert counts[component] == parameters + buffer, component
    position_table = expected["mmdit"][1]
    reference_total = sum(parameters for parameters, _ in expected.values())
    assert counts["mmdit_position_table"] == position_table
    assert counts["diffusers_comparable"] == reference_total
    assert counts["total"] == reference_total + position_table
    without_t5 = reference_total - expected["t5"][0]
    assert counts["diffusers_comparable_without_t5"] == without_t5
    assert counts["total_without_t5"] == without_t5 + position_table


# ------------------------------- (c) the catalogue's counts are the analytic ones
@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_parameters_are_the_analytic_counts(name):
    counts = pc.backbone_parameters(catalogue_config(name))
    assert CATALOGUE[name]["parameters"] == counts
