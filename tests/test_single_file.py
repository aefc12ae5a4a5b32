"""Stability single-file SD3 / SD3.5 checkpoints through `from_preset`.

Two tiny random diffusers pipelines (`single_file_fixtures`) are saved as
diffusers folders and as Stability single files, by an inverse mapping
written for the test; diffusers' own `from_single_file` must read those
files back to the exact diffusers weights. Then:

- "sd3" (no q/k norm): one file with every component (CLIP-L, CLIP-G, T5),
  loaded by its path;
- "sd35" (RMS q/k norm, an MMDiT-X dual-attention block): Stability's
  repository layout, the model file plus `text_encoders/clip_l.safetensors`
  (without a text projection: the identity, as the reference uses),
  `clip_g.safetensors`, `t5xxl_fp16.safetensors`, loaded by its folder;

each must generate what the diffusers folder generates, with the same
injected noise. Corrupt and hostile files: `test_single_file_errors.py`.
"""

import contextlib
import importlib.util
import io
import os
import shutil

import huggingface_hub
import numpy as np
import pytest
import single_file_fixtures as sff
from hub_fixtures import fill_hf_cache

from keras_diffusion.converters import stability_config
from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.models import Backbone, ImageToImage, Preprocessor
from keras_diffusion.presets import catalogue

pytest.importorskip("diffusers")
pytest.importorskip("safetensors.numpy")

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py")
ALL_IN_ONE = sff.ALL_IN_ONE


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(pipeline, diffusers folder, single file with tokenizers beside it)."""
    return sff.sd3_case(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    """(pipeline, diffusers folder, Stability repository folder)."""
    return sff.sd35_case(tmp_path_factory.mktemp("sd35"))


def _model_file(case):
    _, _, path = case
    return (
        path if os.path.isfile(path) else os.path.join(path, "sd3.5_medium.safetensors")
    )


# ------------------------------------------------ diffusers reads our files
@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_diffusers_from_single_file_reads_the_fixture(kind, request):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    case = request.getfixturevalue(kind)
    pipeline, diffusers, _ = case
    for cls, component, subfolder in (
        (SD3Transformer2DModel, pipeline.transformer, "transformer"),
        (AutoencoderKL, pipeline.vae, "vae"),
    ):
        model = cls.from_single_file(
            _model_file(case),
            config=diffusers,
            subfolder=subfolder,
            local_files_only=True,
        )
        expected, loaded = component.state_dict(), model.state_dict()
        assert expected.keys() == loaded.keys()
        for name, value in expected.items():
            assert np.array_equal(value.numpy(), loaded[name].numpy()), name


# ------------------------------------------------------ loads and generates
def _generate(task, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    shape = (2, 4, 4, 16)
    return task.generate(
        {
            "images": images,
            "prompts": ["a red circle on a blue background", "!!!"],
            "negative_prompts": ["", "blurry"],
        },
        num_steps=3,
        guidance_scale=4.0,
        strength=0.8,
        height=32,
        width=32,
        noise=rng.standard_normal(shape).astype(np.float32),
        posterior_noise=rng.standard_normal(shape).astype(np.float32),
    )


def _same_weights(a, b):
    for x, y in zip(a.weights, b.weights, strict=True):
        assert x.path == y.path
        np.testing.assert_array_equal(
            np.asarray(x.numpy()), np.asarray(y.numpy()), err_msg=x.path
        )


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_single_file_generates_what_the_folder_generates(kind, request):
    _, diffusers, path = request.getfixturevalue(kind)
    direct = ImageToImage.from_preset(diffusers)
    task = ImageToImage.from_preset(path)
    assert type(task) is type(direct)
    ours, theirs = task.backbone.get_config(), direct.backbone.get_config()
    assert ours["mmdit"].pop("mlp_ratio") == 4
    for key in ("clip_l", "clip_g", "t5", "mmdit", "vae", "t5_sequence_length"):
        assert ours[key] == theirs[key], key
    assert ours["height"] == ours["width"] == 256  # the position table's reach
    _same_weights(task.backbone, direct.backbone)
    if kind == "sd35":  # Stability's clip_l has no projection: the identity
        kernel = task.backbone.clip_l.text_projection.kernel.numpy()
        np.testing.assert_array_equal(kernel, np.eye(64, dtype="float32"))
    ids = task.preprocessor.generate_preprocess(["a red circle", ""])
    expected = direct.preprocessor.generate_preprocess(["a red circle", ""])
    for name in ("clip_l", "clip_g", "t5"):
        np.testing.assert_array_equal(ids[name], expected[name])
    ours, theirs = _generate(task), _generate(direct)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_backbone_only_loads_without_tokenizers(sd3, tmp_path, monkeypatch):
    _, _, path = sd3
    lone = tmp_path / "lone" / ALL_IN_ONE
    os.makedirs(lone.parent)
    os.link(path, lone)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    backbone = Backbone.from_preset(str(lone))
    assert backbone.t5 is not None
    with pytest.raises(FileNotFoundError) as error:
        ImageToImage.from_preset(str(lone))
    message = str(error.value)
    for folder in sff.TOKENIZERS:
        assert f"{folder}/" in message
    assert str(lone.parent) in message and "hf://stabilityai" in message


def test_tokenizers_come_from_a_cached_builtin_repo(sd3, tmp_path, monkeypatch):
    """Without tokenizers beside the file, the HF cache of a built-in repo
    serves them; nothing is downloaded (the tests run offline)."""
    _, diffusers, path = sd3
    lone = tmp_path / "lone" / ALL_IN_ONE
    os.makedirs(lone.parent)
    os.link(path, lone)
    tokenizers = tmp_path / "tokenizers"
    sff.copy_tokenizers(diffusers, tokenizers)
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    fill_hf_cache("stabilityai/stable-diffusion-3.5-large", str(tokenizers))
    preprocessor = Preprocessor.from_preset(str(lone))
    expected = Preprocessor.from_preset(diffusers)
    prompts = ["a red circle on a blue background", ""]
    ids, reference = (p.generate_preprocess(prompts) for p in (preprocessor, expected))
    for name in ("clip_l", "clip_g", "t5"):
        np.testing.assert_array_equal(ids[name], reference[name])


def test_config_inference_at_real_sizes():
    """Real SD3 / SD3.5 shapes (diffusers models on the meta device, in
    Stability's names) give the catalogue's configs."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    def source(tensors, prefix=""):
        return TensorSource.from_dict(tensors).scoped(prefix)

    names = ["stable_diffusion_3_medium", "stable_diffusion_3.5_medium"]
    names += ["stable_diffusion_3.5_large"]
    for name in names:
        config = catalogue.get(name)["config"]
        mmdit = config["mmdit"]
        with torch.device("meta"):
            transformer = SD3Transformer2DModel(
                sample_size=128,
                num_layers=mmdit["num_layers"],
                attention_head_dim=64,
                num_attention_heads=mmdit["num_heads"],
                caption_projection_dim=mmdit["hidden_dim"],
                pos_embed_max_size=mmdit["position_size"],
                qk_norm=mmdit["qk_norm"],
                dual_attention_layers=tuple(mmdit["dual_attention_layers"]),
            )
        tensors = sff.mmdit_tensors(transformer)
        kwargs = stability_config.mmdit_kwargs(
            source(tensors, "model.diffusion_model.")
        )
        assert kwargs.pop("mlp_ratio") == 4
        assert kwargs == {
            **mmdit,
            "dual_attention_layers": kwargs["dual_attention_layers"],
        }
        assert list(kwargs["dual_attention_layers"]) == mmdit["dual_attention_layers"]

    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        clips = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=width,
                    intermediate_size=4 * width,
                    num_hidden_layers=layers,
                    num_attention_heads=width // 64,
                    projection_dim=width,
                )
            )
            for width, layers in ((768, 12), (1280, 32))
        ]
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_kv=64,
                d_ff=10240,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        )
    config = catalogue.get("stable_diffusion_3_medium")["config"]
    vae_source = source(sff.vae_tensors(vae), "first_stage_model.")
    assert stability_config.vae_kwargs(vae_source) == {
        **config["vae"],
        "block_channels": (128, 256, 512, 512),
    }
    for clip, name, act in zip(clips, ("clip_l", "clip_g"), ("quick_gelu", "gelu")):
        tensors = sff._numpy(clip)
        assert stability_config.clip_kwargs(source(tensors), act) == config[name]
        tensors.pop("text_projection.weight")  # as in Stability's clip_l
        assert stability_config.clip_kwargs(source(tensors), act) == config[name]
    assert stability_config.t5_kwargs(source(sff._numpy(t5))) == config["t5"]


def test_convert_checkpoint_tool(sd35, tmp_path):
    _, diffusers, folder = sd35
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    output = str(tmp_path / "preset")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tool.main([_model_file(sd35), output]) == 0
    for component in ("clip_l", "clip_g", "t5", "mmdit", "vae"):
        assert f"converted {component} (" in printed.getvalue()
    converted = ImageToImage.from_preset(output)
    _same_weights(converted.backbone, Backbone.from_preset(diffusers))
    assert converted.preprocessor.t5_tokenizer is not None


def test_a_diffusers_folder_wins_over_a_single_file_in_it(sd3, tmp_path):
    """Stability's repositories hold both layouts: the diffusers one is read."""
    from keras_diffusion.converters.diffusers_folder import DiffusersFolder
    from keras_diffusion.converters.stability_single_file import StabilitySingleFile
    from keras_diffusion.presets.loader import open_preset

    _, diffusers, path = sd3
    folder = tmp_path / "both"
    shutil.copytree(diffusers, folder)
    os.link(path, folder / ALL_IN_ONE)
    assert isinstance(open_preset(str(folder)), DiffusersFolder)
    assert isinstance(open_preset(str(folder / ALL_IN_ONE)), StabilitySingleFile)


def test_docstring_examples():
    import doctest

    from keras_diffusion.converters import stability_keys

    for module in (stability_keys, stability_config):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
