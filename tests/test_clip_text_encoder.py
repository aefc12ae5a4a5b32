"""CLIPTextEncoder and its transformers converter against transformers."""

import doctest
import json

import keras
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from keras_diffusion.converters.safetensors_reader import TensorSource
from keras_diffusion.converters.transformers_text import (
    clip_text_encoder_kwargs,
    load_clip_text_encoder,
)
from keras_diffusion.models.stable_diffusion_3 import clip_text_encoder
from keras_diffusion.models.stable_diffusion_3.clip_text_encoder import (
    CLIPTextEncoder,
)
from keras_diffusion.utils.backend import compile_function

VOCAB = 1000
BOS, END = VOCAB - 2, VOCAB - 1  # like CLIP: 49406, 49407
LENGTH = 77
# L: quick_gelu, a current config (eos_token_id is the end token).
# G: gelu, a legacy config (eos_token_id=2: transformers pools at argmax(ids)).
FLAVOURS = {
    "L": {"hidden_act": "quick_gelu", "eos_token_id": END},
    "G": {"hidden_act": "gelu", "eos_token_id": 2},
}


def _token_ids():
    ids = np.zeros((2, LENGTH), dtype="int32")
    # CLIP-L style: the end token repeated as padding.
    ids[0, :] = END
    ids[0, :6] = [BOS, 320, 125, 539, 320, 2]
    # CLIP-G style: one end token, then 0 padding.
    ids[1, :4] = [BOS, 17, 401, END]
    return ids


def _rerandomise(model):
    # transformers initialises biases to 0 and norm weights to 1.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if torch.all(param == 0) or torch.all(param == 1):
                noise = torch.randn(param.shape, generator=generator)
                param.add_(0.1 * noise)


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def reference(request, tmp_path_factory):
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        projection_dim=16,
        max_position_embeddings=LENGTH,
        bos_token_id=BOS,
        pad_token_id=1,
        **FLAVOURS[request.param],
    )
    model = CLIPTextModelWithProjection(config).eval()
    _rerandomise(model)
    path = tmp_path_factory.mktemp(f"clip_{request.param}")
    model.save_pretrained(path)
    with torch.no_grad():
        outputs = model(
            torch.from_numpy(_token_ids()).long(), output_hidden_states=True
        )
    return {
        "path": path,
        "hidden_states": [h.numpy() for h in outputs.hidden_states],
        "pooled": outputs.text_embeds.numpy(),
    }


def _convert(path, **kwargs):
    with open(path / "config.json") as f:
        config = json.load(f)
    encoder = CLIPTextEncoder(**clip_text_encoder_kwargs(config), **kwargs)
    load_clip_text_encoder(encoder, TensorSource.from_files(path / "model.safetensors"))
    return encoder


def _tensors(path):
    source = TensorSource.from_files(path / "model.safetensors")
    return {name: source.get(name) for name in source.keys()}


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


@pytest.mark.parametrize("index", [-2, -1, 0])
def test_matches_transformers(reference, index):
    encoder = _convert(reference["path"], hidden_state_index=index)
    outputs = encoder(_token_ids())
    hidden = _numpy(outputs["hidden_states"])
    pooled = _numpy(outputs["pooled"])
    np.testing.assert_allclose(hidden, reference["hidden_states"][index], atol=1e-5)
    np.testing.assert_allclose(pooled, reference["pooled"], atol=1e-5)


def test_compiled_matches_transformers(reference):
    # Compiled (on tensorflow: its alike layers share one trace).
    encoder = _convert(reference["path"], hidden_state_index=-2)
    outputs = compile_function(encoder, encoder.variables)(_token_ids())
    np.testing.assert_allclose(
        _numpy(outputs["hidden_states"]), reference["hidden_states"][-2], atol=1e-5
    )
    np.testing.assert_allclose(
        _numpy(outputs["pooled"]), reference["pooled"], atol=1e-5
    )


def test_pools_at_first_end_token(reference):
    encoder = _convert(reference["path"])
    ids = _token_ids()
    expected = _numpy(encoder(ids)["pooled"])
    # Changing tokens after the first end token cannot change the pooled
    # output of a causal model pooled there.
    ids[0, 7:] = 5
    ids[1, 5:] = END
    np.testing.assert_allclose(_numpy(encoder(ids)["pooled"]), expected, atol=1e-6)


def test_bfloat16_is_finite_and_close(reference):
    encoder = _convert(reference["path"], dtype="bfloat16")
    outputs = encoder(_token_ids())
    assert keras.backend.standardize_dtype(outputs["pooled"].dtype) == "bfloat16"
    for key, expected in (
        ("hidden_states", reference["hidden_states"][-2]),
        ("pooled", reference["pooled"]),
    ):
        actual = _numpy(outputs[key])
        assert np.all(np.isfinite(actual)), key
        np.testing.assert_allclose(actual, expected, atol=0.1, rtol=0.05)


def test_get_config_round_trip():
    encoder = CLIPTextEncoder(
        embedding_dim=32,
        num_layers=2,
        num_heads=4,
        intermediate_dim=37,
        intermediate_activation="gelu",
        projection_dim=16,
        vocabulary_size=VOCAB,
        end_token_id=END,
        hidden_state_index=-1,
        name="clip_g",
    )
    config = encoder.get_config()
    restored = CLIPTextEncoder.from_config(config)
    assert restored.get_config() == config
    name = keras.saving.get_registered_name(CLIPTextEncoder)
    assert name == "keras_diffusion>CLIPTextEncoder"
    assert keras.saving.get_registered_object(name) is CLIPTextEncoder


def test_kwargs_from_legacy_config():
    config = {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "eos_token_id": 2,
    }
    kwargs = clip_text_encoder_kwargs(config)
    assert kwargs["end_token_id"] == 49407
    assert kwargs["layer_norm_epsilon"] == 1e-5
    assert clip_text_encoder_kwargs({**config, "eos_token_id": 49407}) == kwargs


def test_hidden_state_index_out_of_range():
    with pytest.raises(ValueError, match="hidden_state_index"):
        CLIPTextEncoder(32, 2, 4, 37, "gelu", 16, hidden_state_index=3)


def test_wrong_shape_tensor_is_named(reference):
    tensors = _tensors(reference["path"])
    name = "text_model.encoder.layers.1.self_attn.k_proj.weight"
    tensors[name] = np.zeros((32, 31), "float32")
    encoder = _convert_config(reference["path"])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_clip_text_encoder(encoder, TensorSource.from_dict(tensors))


def test_missing_tensor_is_named(reference):
    tensors = _tensors(reference["path"])
    name = "text_model.encoder.layers.2.mlp.fc2.bias"
    del tensors[name]
    encoder = _convert_config(reference["path"])
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_clip_text_encoder(encoder, TensorSource.from_dict(tensors))


def test_unused_tensor_is_an_error_but_position_ids_is_not(reference):
    tensors = _tensors(reference["path"])
    tensors["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]
    load_clip_text_encoder(
        _convert_config(reference["path"]), TensorSource.from_dict(tensors)
    )
    tensors["logit_scale"] = np.ones((), "float32")
    with pytest.raises(ValueError, match="logit_scale"):
        load_clip_text_encoder(
            _convert_config(reference["path"]), TensorSource.from_dict(tensors)
        )


def _convert_config(path):
    with open(path / "config.json") as f:
        return CLIPTextEncoder(**clip_text_encoder_kwargs(json.load(f)))


def test_docstring_examples():
    result = doctest.testmod(clip_text_encoder)
    assert result.attempted > 0
    assert result.failed == 0
