"""T5Encoder and its transformers converter against transformers."""

import doctest
import json

import keras
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from keras_diffusion.converters import transformers_text
from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.converters.transformers_text import (
    load_t5_encoder,
    t5_encoder_kwargs,
)
from keras_diffusion.models.stable_diffusion_3 import t5_encoder
from keras_diffusion.models.stable_diffusion_3.t5_encoder import (
    T5Encoder,
    relative_position_buckets,
)
from keras_diffusion.utils.backend import compile_function

VOCAB = 1000
LENGTH = 160  # longer than relative_attention_max_distance: buckets saturate
BLOCK0 = "encoder.block.0.layer."


def _token_ids():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, VOCAB, size=(2, LENGTH)).astype("int32")
    ids[0, 12] = 1  # end of sequence, then 0 padding
    ids[0, 13:] = 0
    ids[1, -1] = 1
    return ids


def _save_reference(path, wo_scale=1.0):
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=37,
        num_layers=2,
        feed_forward_proj="gated-gelu",
    )
    model = T5EncoderModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            # RMSNorm weights are initialised to 1.
            if torch.all(param == 1) or torch.all(param == 0):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(wo_scale)
    model.save_pretrained(path)
    with torch.no_grad():
        ids = torch.from_numpy(_token_ids()).long()
        return model(ids).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    return {"path": path, "last_hidden_state": _save_reference(path)}


def _convert(path, **kwargs):
    with open(path / "config.json") as f:
        config = json.load(f)
    encoder = T5Encoder(**t5_encoder_kwargs(config), **kwargs)
    load_t5_encoder(encoder, TensorSource.from_files(path / "model.safetensors"))
    return encoder


def _tensors(path):
    source = TensorSource.from_files(path / "model.safetensors")
    return {name: source.get(name) for name in source.keys()}


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def test_matches_transformers(reference):
    encoder = _convert(reference["path"])
    actual = _numpy(encoder(_token_ids()))
    np.testing.assert_allclose(actual, reference["last_hidden_state"], atol=1e-5)


def test_compiled_matches_transformers(reference):
    # Compiled (on tensorflow: its alike layers share one trace).
    encoder = _convert(reference["path"])
    actual = _numpy(compile_function(encoder, encoder.variables)(_token_ids()))
    np.testing.assert_allclose(actual, reference["last_hidden_state"], atol=1e-5)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256)])
def test_buckets_match_transformers(num_buckets, max_distance):
    length = 600
    positions = torch.arange(length)
    expected = T5Attention._relative_position_bucket(
        positions[None, :] - positions[:, None],
        bidirectional=True,
        num_buckets=num_buckets,
        max_distance=max_distance,
    ).numpy()
    actual = keras.ops.convert_to_numpy(
        relative_position_buckets(length, length, num_buckets, max_distance)
    )
    np.testing.assert_array_equal(actual, expected)


def test_embedding_from_either_name(reference):
    expected = _numpy(_convert(reference["path"])(_token_ids()))
    tensors = _tensors(reference["path"])
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    for names in (("shared.weight",), ()):
        for name in names:
            del tensors[name]
        encoder = _convert_config(reference["path"])
        load_t5_encoder(encoder, TensorSource.from_dict(tensors))
        np.testing.assert_allclose(_numpy(encoder(_token_ids())), expected, atol=0)


def test_bfloat16_is_finite_and_close(reference):
    output = _convert(reference["path"], dtype="bfloat16")(_token_ids())
    assert keras.backend.standardize_dtype(output.dtype) == "bfloat16"
    actual = _numpy(output)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(
        actual, reference["last_hidden_state"], atol=0.1, rtol=0.05
    )


def test_float16_survives_activations_beyond_float16_range(tmp_path):
    # Scale block 0's `wo` so the residual stream exceeds float16's 65504.
    expected = _save_reference(tmp_path, wo_scale=3e4)
    encoder = _convert(tmp_path)
    assert np.max(np.abs(_residual_after_block_0(encoder))) > 65504
    actual = _numpy(_convert(tmp_path, dtype="float16")(_token_ids()))
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, atol=0.1, rtol=0.05)


def _residual_after_block_0(encoder):
    ids = _token_ids()
    x = keras.ops.cast(encoder.token_embedding(ids), "float32")
    buckets = relative_position_buckets(LENGTH, LENGTH)
    bias = keras.ops.transpose(encoder.relative_attention_bias(buckets), (2, 0, 1))
    return _numpy(encoder.encoder_layers[0](x, bias[None]))


def test_get_config_round_trip():
    encoder = T5Encoder(
        vocabulary_size=VOCAB,
        hidden_dim=32,
        num_layers=2,
        num_heads=4,
        key_value_dim=8,
        intermediate_dim=37,
        relative_attention_max_distance=64,
        name="t5",
    )
    config = encoder.get_config()
    assert T5Encoder.from_config(config).get_config() == config
    name = keras.saving.get_registered_name(T5Encoder)
    assert name == "keras_diffusion>T5Encoder"
    assert keras.saving.get_registered_object(name) is T5Encoder


def test_kwargs_reject_t5_v1_0():
    with pytest.raises(ValueError, match="gated-gelu"):
        t5_encoder_kwargs(
            {
                "vocab_size": 32128,
                "d_model": 512,
                "num_layers": 6,
                "num_heads": 8,
                "d_kv": 64,
                "d_ff": 2048,
                "feed_forward_proj": "relu",
            }
        )


def test_wrong_shape_tensor_is_named(reference):
    tensors = _tensors(reference["path"])
    name = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    tensors[name] = np.zeros((36, 32), "float32")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_t5_encoder(
            _convert_config(reference["path"]), TensorSource.from_dict(tensors)
        )


def test_missing_tensor_is_named(reference):
    tensors = _tensors(reference["path"])
    name = BLOCK0 + "0.SelfAttention.relative_attention_bias.weight"
    del tensors[name]
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_t5_encoder(
            _convert_config(reference["path"]), TensorSource.from_dict(tensors)
        )


def test_unused_tensor_is_named(reference):
    tensors = _tensors(reference["path"])
    name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    tensors[name] = np.zeros((32, 4), "float32")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_t5_encoder(
            _convert_config(reference["path"]), TensorSource.from_dict(tensors)
        )


def _convert_config(path):
    with open(path / "config.json") as f:
        return T5Encoder(**t5_encoder_kwargs(json.load(f)))


@pytest.mark.parametrize("module", [t5_encoder, transformers_text])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
