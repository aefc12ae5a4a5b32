"""StableDiffusion3Preprocessor: token ids, training inputs, preset round-trip."""

import numpy as np
import pytest

import keras_diffusion as kd


@pytest.fixture(scope="module")
def preprocessor():
    return kd.models.StableDiffusion3Preprocessor.from_preset("sd3_tiny_demo")


def test_generate_preprocess(preprocessor):
    ids = preprocessor.generate_preprocess(["a red circle", "a blue square!!!"])
    assert set(ids) == {"clip_l", "clip_g"}  # the demo has no T5
    length = preprocessor.clip_l_tokenizer.sequence_length
    assert ids["clip_l"].shape == ids["clip_g"].shape == (2, length)
    end = preprocessor.clip_l_tokenizer.end_token_id
    # CLIP-L pads with the end token, CLIP-G with "!" (id 0 in CLIP's vocabulary
    # order; the demo vocabulary starts with the same byte symbols).
    assert ids["clip_l"][0, -1] == end
    assert ids["clip_g"][0, -1] == 0


def test_training_call(preprocessor):
    images = np.zeros((2, 64, 64, 3), np.uint8)
    out = preprocessor({"images": images, "prompts": ["a", "b"]})
    assert out["images"].dtype == np.float32 and out["images"].min() == -1.0
    assert out["clip_l"].shape == (2, preprocessor.clip_l_tokenizer.sequence_length)
    with pytest.raises(ValueError, match="exactly the keys"):
        preprocessor({"images": images})
    with pytest.raises(ValueError, match="2 images"):
        preprocessor({"images": images, "prompts": ["a"]})
    with pytest.raises(TypeError, match="prompts"):
        preprocessor.generate_preprocess([None])


def test_preset_round_trip(preprocessor, tmp_path):
    preprocessor.save_to_preset(tmp_path / "p")
    assert (tmp_path / "p" / "assets" / "clip_g_tokenizer" / "merges.txt").exists()
    loaded = kd.models.Preprocessor.from_preset(str(tmp_path / "p"))
    assert type(loaded) is kd.models.StableDiffusion3Preprocessor
    prompts = ["a red circle on a blue background", "", "unknown words ok"]
    a, b = (
        preprocessor.generate_preprocess(prompts),
        loaded.generate_preprocess(prompts),
    )
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert loaded.clip_g_tokenizer.pad_token == "!"


def test_get_config_round_trip(preprocessor):
    config = preprocessor.get_config()
    assert config["t5_tokenizer"] is None
    assert (
        config["clip_l_tokenizer"]["registered_name"] == "keras_diffusion>CLIPTokenizer"
    )
