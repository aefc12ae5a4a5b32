"""`tools/convert_checkpoint.py`: a diffusers SD3 folder -> a task preset.

The tiny reference folder of `sd3_fixtures` is converted; the preset must
hold every preset file and generate exactly what loading the folder
directly generates (same injected noise).
"""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import keras
import ml_dtypes
import numpy as np
import pytest
import sd3_fixtures

from keras_diffusion.models import Backbone, ImageToImage

pytest.importorskip("diffusers")

TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_checkpoint.py")
PRESET_FILES = [
    "assets",
    "config.json",
    "metadata.json",
    "model.safetensors",
    "preprocessor.json",
    "task.json",
]


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    pipeline = sd3_fixtures.build_reference_pipeline("sd3")
    folder = tmp_path_factory.mktemp("reference") / "diffusers"
    return sd3_fixtures.save_reference_folder(pipeline, folder)


@pytest.fixture(scope="module")
def direct(source):
    return ImageToImage.from_preset(source)


@pytest.fixture(scope="module")
def converted(tool, source, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("converted") / "preset")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert tool.main([source, output]) == 0
    return output, printed.getvalue()


def _generate(task, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, 32, 32, 3)).astype(np.uint8)
    shape = (batch, 4, 4, 16)
    return task.generate(
        {
            "images": images,
            "prompts": ["a red circle on a blue background", "!!!"][:batch],
            "negative_prompts": ["", "blurry"][:batch],
        },
        num_steps=3,
        guidance_scale=4.0,
        strength=0.8,
        height=32,
        width=32,
        noise=rng.standard_normal(shape).astype(np.float32),
        posterior_noise=rng.standard_normal(shape).astype(np.float32),
    )


def test_preset_holds_every_file(converted, direct):
    output, _ = converted
    assert sorted(os.listdir(output)) == PRESET_FILES
    assert sorted(os.listdir(os.path.join(output, "assets"))) == [
        "clip_g_tokenizer",
        "clip_l_tokenizer",
    ]
    with open(os.path.join(output, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["parameter_count"] == direct.backbone.count_params()
    with open(os.path.join(output, "task.json")) as f:
        task = json.load(f)
    assert task["registered_name"] == "keras_diffusion>StableDiffusion3ImageToImage"


def test_prints_progress_per_component(converted):
    _, printed = converted
    for component in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        assert f"converted {component} (" in printed
    for component in ("clip_l", "clip_g", "mmdit", "vae"):
        assert f"  {component}: " in printed
    assert "Writing" in printed and "Done" in printed


def test_preset_generates_what_the_folder_generates(converted, direct):
    output, _ = converted
    loaded = ImageToImage.from_preset(output)
    assert type(loaded) is type(direct)
    configs = [dict(t.backbone.get_config(), name=None) for t in (loaded, direct)]
    assert json.dumps(configs[0]) == json.dumps(configs[1])
    np.testing.assert_array_equal(_generate(loaded), _generate(direct))


def test_dtype_option(tool, source, direct, converted, tmp_path):
    output = tmp_path / "bf16"
    assert tool.main([source, str(output), "--dtype", "bfloat16", "--quiet"]) == 0
    with open(output / "config.json") as f:
        assert "bfloat16" in json.dumps(json.load(f)["config"]["dtype"])
    backbone = Backbone.from_preset(str(output))
    assert backbone.compute_dtype == "bfloat16"
    float32_size = os.path.getsize(os.path.join(converted[0], "model.safetensors"))
    assert os.path.getsize(output / "model.safetensors") < 0.6 * float32_size
    # Every weight is the float32 one rounded to bfloat16, except the float32
    # islands (norms, ...), which keep their float32 values.
    for ours, reference in zip(backbone.weights, direct.backbone.weights):
        assert ours.path == reference.path
        dtype = keras.backend.standardize_dtype(ours.dtype)
        expected = keras.ops.convert_to_numpy(reference.value)
        if dtype == "bfloat16":
            expected = expected.astype(ml_dtypes.bfloat16)
        else:
            assert dtype == "float32", ours.path
        actual = keras.ops.convert_to_numpy(ours.value).astype("float32")
        np.testing.assert_array_equal(actual, expected.astype("float32"))


def test_runs_as_a_script(tmp_path):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, TOOL, str(tmp_path / "missing"), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "convert_checkpoint: error:" in result.stderr
    assert "does not exist" in result.stderr
    assert not output.exists()
    result = subprocess.run(
        [sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--dtype" in result.stdout


def test_errors_leave_no_output(tool, tmp_path, capsys):
    output = tmp_path / "out"
    assert tool.main([str(tmp_path / "missing"), str(output)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not output.exists()

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    assert tool.main(["sd3_tiny_demo", str(occupied), "--quiet"]) == 2
    assert "Refusing" in capsys.readouterr().err
    assert os.listdir(occupied) == ["notes.txt"]
