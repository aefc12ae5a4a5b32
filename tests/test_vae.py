"""Parity of the SD3 VAE and its converter with diffusers' `AutoencoderKL`."""

import contextlib
import inspect
import json
import os

import keras
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from keras import ops

from keras_diffusion.converters.diffusers_vae import load_vae, vae_kwargs
from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.models.stable_diffusion_3.vae import VAE, VAEDecoder, VAEEncoder
from keras_diffusion.models.stable_diffusion_3.vae_blocks import GroupNorm

TINY = dict(
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)
ATOL = 1e-4


def _reference(tmp_path, **overrides):
    """A tiny random AutoencoderKL saved with save_pretrained; returns (model, dir)."""
    torch.manual_seed(0)
    model = AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # group-norm scales
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))  # biases and norm shifts
        # Push two log-variance channels past the clamp so it is exercised.
        bias = model.encoder.conv_out.bias
        bias[TINY["latent_channels"]] = 40.0
        bias[TINY["latent_channels"] + 1] = -40.0
    assert all(bool((p != 0).all()) for p in model.parameters())
    path = tmp_path / "vae"
    model.save_pretrained(path)
    return model, path


@contextlib.contextmanager
def _zero_kernel_init():
    """Build with zero kernels: the converter overwrites every weight anyway.

    On JAX each new kernel shape otherwise compiles its own random-number
    kernel, which dominates this file's run time on a CPU.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            keras.initializers.GlorotUniform,
            "__call__",
            lambda self, shape, dtype=None: ops.zeros(shape, dtype),
        )
        yield


def _convert(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    vae = VAE(**vae_kwargs(config))
    with _zero_kernel_init():
        vae.build()
    files = os.path.join(path, "diffusion_pytorch_model.safetensors")
    load_vae(vae, TensorSource.from_files(files))
    return vae


def _blank_like(vae):
    other = VAE.from_config(vae.get_config())
    with _zero_kernel_init():
        other.build()
    return other


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _max_diff(ours, ref):
    return float(np.max(np.abs(ops.convert_to_numpy(ours) - ref)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model, path = _reference(tmp_path_factory.mktemp("ref"))
    return model, path, _convert(path)


def test_encode_matches_diffusers(converted):
    model, _, vae = converted
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(_nchw(images)).latent_dist
    mean, log_variance = vae.encode(images)
    assert tuple(mean.shape) == (2, 4, 6, 16) == tuple(log_variance.shape)
    ref_logvar = _nhwc(posterior.logvar)
    assert (ref_logvar == 20.0).any() and (ref_logvar == -30.0).any()
    diff_mean = _max_diff(mean, _nhwc(posterior.mean))
    diff_logvar = _max_diff(log_variance, ref_logvar)
    print(f"[{keras.backend.backend()}] mean {diff_mean:.2e} logvar {diff_logvar:.2e}")
    assert diff_mean <= ATOL
    assert diff_logvar <= ATOL


def test_decode_matches_diffusers(converted):
    model, _, vae = converted
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, 4, 6, 16)).astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(model.decode(_nchw(latents)).sample)
    images = vae.decode(latents)
    assert tuple(images.shape) == (2, 32, 48, 3)
    diff = _max_diff(images, ref)
    print(f"[{keras.backend.backend()}] decode {diff:.2e}")
    assert diff <= ATOL


def test_reconstruction_matches_diffusers(converted):
    model, _, vae = converted
    # Same shapes as the encode/decode tests (cheaper on eager JAX).
    images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 48, 3))
    images = images.astype(np.float32)
    with torch.no_grad():
        ref = _nhwc(model(_nchw(images), sample_posterior=False).sample)
    assert _max_diff(vae(images), ref) <= ATOL


def test_quant_convs_match_diffusers(tmp_path):
    # Same shapes as the other tests, so eager JAX reuses its compiled ops.
    model, path = _reference(tmp_path, use_quant_conv=True, use_post_quant_conv=True)
    vae = _convert(path)
    assert vae.use_quant_conv and vae.use_post_quant_conv
    images = np.random.default_rng(3).uniform(-1, 1, (2, 32, 48, 3))
    images = images.astype(np.float32)
    latents = np.random.default_rng(4).standard_normal((2, 4, 6, 16))
    latents = latents.astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(_nchw(images)).latent_dist
        ref_images = _nhwc(model.decode(_nchw(latents)).sample)
    mean, log_variance = vae.encode(images)
    assert _max_diff(mean, _nhwc(posterior.mean)) <= ATOL
    assert _max_diff(log_variance, _nhwc(posterior.logvar)) <= ATOL
    assert _max_diff(vae.decode(latents), ref_images) <= ATOL


def test_group_norm_is_accurate_for_large_activations():
    # Decoder activations can have a large mean; E[x^2] - E[x]^2 would lose it.
    rng = np.random.default_rng(6)
    x = (3000.0 + rng.standard_normal((2, 5, 7, 16))).astype(np.float32)
    reference = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 1.5, 16))
        reference.bias.copy_(torch.linspace(-1.0, 1.0, 16))
        expected = _nhwc(reference(_nchw(x)))
    norm = GroupNorm(4, 1e-6, dtype="bfloat16")
    norm.build(x.shape)
    norm.gamma.assign(np.linspace(0.5, 1.5, 16, dtype=np.float32))
    norm.beta.assign(np.linspace(-1.0, 1.0, 16, dtype=np.float32))
    out = norm(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert _max_diff(out, expected) <= 1e-3


def test_latent_scaling_uses_config(converted):
    _, _, vae = converted
    assert vae.scaling_factor == 1.5305 and vae.shift_factor == 0.0609
    z = np.linspace(-2, 2, 2 * 4 * 6 * 16, dtype=np.float32).reshape(2, 4, 6, 16)
    scaled = ops.convert_to_numpy(vae.scale_latents(z))
    np.testing.assert_allclose(scaled, (z - 0.0609) * 1.5305, rtol=1e-6)
    back = ops.convert_to_numpy(vae.unscale_latents(scaled))
    np.testing.assert_allclose(back, z, atol=1e-6)


def test_vae_kwargs_from_sd3_config():
    sd3 = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }
    kwargs = vae_kwargs(sd3)
    assert kwargs == {
        "block_channels": (128, 256, 512, 512),
        "encoder_layers_per_block": 2,
        "decoder_layers_per_block": 3,
        "latent_channels": 16,
        "norm_groups": 32,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    # The SD3 config is also the VAE's default.
    defaults = inspect.signature(VAE).parameters
    assert all(defaults[k].default == v for k, v in kwargs.items())
    with pytest.raises(ValueError, match="act_fn"):
        vae_kwargs({**sd3, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="up_block_types"):
        vae_kwargs({**sd3, "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="latent_channels"):
        vae_kwargs({k: v for k, v in sd3.items() if k != "latent_channels"})


@pytest.mark.parametrize("cls", [VAE, VAEEncoder, VAEDecoder])
def test_get_config_round_trip(cls):
    layer = cls(block_channels=(8, 16), norm_groups=4, name="tiny")
    config = layer.get_config()
    rebuilt = cls.from_config(config)
    assert rebuilt.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"keras_diffusion>{cls.__name__}"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def test_converted_weights_round_trip_through_config(converted):
    _, _, vae = converted
    rebuilt = _blank_like(vae)
    rebuilt.set_weights(vae.get_weights())
    latents = np.random.default_rng(5).standard_normal((2, 4, 6, 16))
    latents = latents.astype(np.float32)
    assert (
        _max_diff(rebuilt.decode(latents), ops.convert_to_numpy(vae.decode(latents)))
        == 0
    )


def _state_dict(path):
    source = TensorSource.from_files(
        os.path.join(path, "diffusion_pytorch_model.safetensors")
    )
    return {k: source.get(k) for k in source.keys()}, source


def test_wrong_shape_tensor_is_named(converted):
    _, path, vae = converted
    arrays, _ = _state_dict(path)
    name = "decoder.up_blocks.1.resnets.2.conv1.weight"
    arrays[name] = arrays[name][:, :-1]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_vae(_blank_like(vae), TensorSource.from_dict(arrays))


def test_missing_and_unused_tensors_are_named(converted):
    _, path, vae = converted
    arrays, _ = _state_dict(path)
    name = "encoder.mid_block.attentions.0.to_q.bias"
    missing = {k: v for k, v in arrays.items() if k != name}
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_vae(_blank_like(vae), TensorSource.from_dict(missing))
    extra = {**arrays, "quant_conv.weight": np.ones((32, 32, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"quant_conv\.weight"):
        load_vae(_blank_like(vae), TensorSource.from_dict(extra))


def test_scoped_single_file_source(converted):
    _, path, vae = converted
    arrays, _ = _state_dict(path)
    prefixed = TensorSource.from_dict({f"vae.{k}": v for k, v in arrays.items()})
    other = _blank_like(vae)
    load_vae(other, prefixed.scoped("vae."))
    for a, b in zip(other.get_weights(), vae.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
