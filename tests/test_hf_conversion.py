"""`hf://` handles of diffusers-layout repos: selection, conversion, cache.

A tiny random diffusers SD3 pipeline (`sd3_fixtures`, with T5; its T5 saved
sharded) is put into the real Hugging Face cache as a repo, next to files a
conversion must not read: half-precision variants (corrupt, so reading one
fails), a `.bin` duplicate, a top-level single-file checkpoint. Loading it
over `hf://` must equal loading the clean folder locally; the second load
must come from the conversion cache without converting. The gated-repo
error is produced by the real `huggingface_hub` client, online, against a
loopback server that answers as the Hub does.
"""

import http.server
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import sd3_fixtures
from hub_fixtures import fill_hf_cache
from no_writes import file_tree

from keras_diffusion.models import ImageToImage
from keras_diffusion.presets import hf_conversion
from keras_diffusion.presets.loader import open_preset
from keras_diffusion.presets.preset_io import PresetFolder, is_preset

pytest.importorskip("diffusers")

SRC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
DECOYS = {  # files the conversion must never read
    "transformer/diffusion_pytorch_model.fp16.safetensors": b"\x10\x00garbage",
    "transformer/diffusion_pytorch_model.bin": b"not a pickle",
    "text_encoder/model.fp16-00001-of-00002.safetensors": b"\x10\x00garbage",
    "text_encoder/model.fp16-00002-of-00002.safetensors": b"\x10\x00garbage",
    "vae/diffusion_pytorch_model.bin": b"not a pickle",
    "sd3_tiny_single_file.safetensors": b"\x10\x00garbage",
    "README.md": b"# tiny\n",
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    pipeline = sd3_fixtures.build_reference_pipeline("sd3", with_t5=True)
    folder = tmp_path_factory.mktemp("reference") / "diffusers"
    sd3_fixtures.save_reference_folder(pipeline, folder)
    t5 = folder / "text_encoder_3"
    for f in t5.glob("*.safetensors"):
        f.unlink()
    pipeline.text_encoder_3.save_pretrained(t5, max_shard_size="60KB")
    assert (t5 / "model.safetensors.index.json").exists()
    return str(folder)


def _with_decoys(clean, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(clean, folder)
    for rel, data in DECOYS.items():
        (folder / rel).write_bytes(data)
    return str(folder)


def _outputs(task):
    """Eager outputs of the CLIP encoders, the MMDiT and the VAE decoder."""
    backbone = task.backbone
    ids = task.preprocessor.generate_preprocess(["a red circle", ""])
    # T5 runs too slowly op by op on jax; its weights are compared bitwise.
    context, pooled = backbone.encode_text(ids["clip_l"], ids["clip_g"])
    latents = np.random.default_rng(0).standard_normal((2, 4, 4, 16))
    latents = latents.astype("float32")
    velocity = backbone.guided_velocity(latents, context, pooled, 0.5, 2.0, False)
    outputs = [ids["t5"], context, pooled, velocity, backbone.decode(latents)]
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outputs]


@pytest.fixture(scope="module")
def converted(clean, tmp_path_factory):
    """The repo with decoys in the HF cache, loaded (so converted) once."""
    repo = _with_decoys(clean, tmp_path_factory.mktemp("hf-repo"))
    snapshot = fill_hf_cache("someone/tiny-sd3", repo)
    before = len(hf_conversion.conversions)
    task = ImageToImage.from_preset("hf://someone/tiny-sd3")
    assert len(hf_conversion.conversions) == before + 1
    target = os.path.join(
        os.environ["KERAS_DIFFUSION_CACHE"],
        "converted",
        "someone--tiny-sd3",
        os.path.basename(snapshot),
    )
    return task, target, hf_conversion.conversions[-1]


def test_only_the_needed_files_are_read(converted):
    _, target, record = converted
    assert is_preset(target)
    files = record["files"]
    assert not set(files) & set(DECOYS)
    assert "text_encoder_3/model.safetensors.index.json" in files
    assert "scheduler/scheduler_config.json" in files
    assert any(f.startswith("tokenizer_3/") for f in files)
    assert all(f == "model_index.json" or "/" in f for f in files)


def test_hf_outputs_equal_the_local_folder(clean, converted):
    task = converted[0]
    local = ImageToImage.from_preset(clean)
    assert type(local) is type(task)
    configs = [json.loads(json.dumps(t.backbone.get_config())) for t in (local, task)]
    for config in configs:
        config.pop("name")
    assert configs[0] == configs[1]
    for a, b in zip(local.backbone.weights, task.backbone.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))
    for a, b in zip(_outputs(local), _outputs(task), strict=True):
        np.testing.assert_array_equal(a, b)


def test_second_load_comes_from_the_cache(converted):
    task, target, _ = converted
    count = len(hf_conversion.conversions)
    stamps = file_tree(target)
    again = ImageToImage.from_preset("hf://someone/tiny-sd3")
    assert len(hf_conversion.conversions) == count  # not converted again
    assert file_tree(target) == stamps  # nor rewritten
    for a, b in zip(task.backbone.weights, again.backbone.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a.numpy()), np.asarray(b.numpy()))


def test_converted_preset_loads_in_the_current_policy(converted, monkeypatch):
    """A half-precision conversion is not forced on the user: the dtype given,
    else the current Keras policy, as for the diffusers folder itself."""
    seen = []
    monkeypatch.setattr(
        PresetFolder,
        "load_backbone",
        lambda self, base, weights, dtype: seen.append(dtype),
    )
    folder = open_preset("hf://someone/tiny-sd3")
    assert isinstance(folder, hf_conversion.ConvertedPreset)
    folder.load_backbone(None)
    folder.load_backbone(None, True, "bfloat16")
    keras.config.set_dtype_policy("mixed_bfloat16")
    folder.load_backbone(None)
    assert seen == ["float32", "bfloat16", "mixed_bfloat16"]


def _failed_conversion_leaves_nothing(repo, folder):
    fill_hf_cache(repo, folder)
    parent = os.path.join(
        os.environ["KERAS_DIFFUSION_CACHE"], "converted", repo.replace("/", "--")
    )
    before = len(hf_conversion.conversions)
    with pytest.raises((ValueError, OSError)) as error:
        ImageToImage.from_preset(f"hf://{repo}")
    assert len(hf_conversion.conversions) == before
    assert not os.path.exists(parent) or os.listdir(parent) == []
    return str(error.value)


def test_truncated_safetensors_write_nothing(clean, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(clean, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _failed_conversion_leaves_nothing("someone/truncated", folder)
    assert "truncated" in message or "corrupt" in message


def test_bin_only_repo_writes_nothing(clean, tmp_path):
    folder = tmp_path / "bin-only"
    shutil.copytree(clean, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    message = _failed_conversion_leaves_nothing("someone/bin-only", folder)
    assert "pickle" in message and "transformer" in message


def test_select_files_prefers_plain_then_one_variant():
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None],
    }
    files = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "transformer/diffusion_pytorch_model.bin",
        "text_encoder_3/config.json",
        "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.json",
        "text_encoder_3/model.fp16-00001-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.fp16.json",
        "tokenizer_3/spiece.model",
        "tokenizer_3/tokenizer_config.json",
        "tokenizer_3/added_tokens.json",
        "sd3.5_large.safetensors",
    ]
    assert hf_conversion.select_files(files, index) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "text_encoder_3/config.json",
        "text_encoder_3/model-00001-of-00002.safetensors",
        "text_encoder_3/model-00002-of-00002.safetensors",
        "text_encoder_3/model.safetensors.index.json",
        "tokenizer_3/tokenizer_config.json",
        "tokenizer_3/spiece.model",
    ]


def test_storage_dtype_keeps_half_precision(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    half = tmp_path / "half.safetensors"
    safetensors_numpy.save_file({"a": np.zeros(2, np.float16)}, str(half))
    full = tmp_path / "full.safetensors"
    safetensors_numpy.save_file({"b": np.zeros(2, np.float32)}, str(full))
    assert hf_conversion.storage_dtype([half]) == "float16"
    assert hf_conversion.storage_dtype([half, full]) == "float32"


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub does for a gated repo."""

    authorizations = []

    def _gated(self):
        auth = self.headers.get("Authorization")
        type(self).authorizations.append(auth)
        status = 403 if auth else 401
        body = b'{"error": "Access to model owner/gated is restricted."}'
        self.send_response(status)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header(
            "X-Error-Message", "Access to model owner/gated is restricted."
        )
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _gated  # noqa: N815

    def log_message(self, *args):
        pass


def test_gated_repo_error_names_the_gate_and_hf_token(tmp_path):
    _GatedHub.authorizations = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = textwrap.dedent(
        """
        import os
        import keras_diffusion as kd
        for token in (None, "hf_test_token"):
            if token:
                os.environ["HF_TOKEN"] = token
            try:
                kd.models.ImageToImage.from_preset("hf://owner/gated")
            except PermissionError as e:
                print("PermissionError:", e)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_HOME": str(tmp_path / "home"),
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONPATH": SRC,
    }
    env.pop("HF_TOKEN", None)
    try:
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()
    errors = [
        line for line in result.stdout.splitlines() if line.startswith("Permission")
    ]
    assert len(errors) == 2, result.stdout + result.stderr
    for line in errors:
        assert "gated" in line and "HF_TOKEN" in line and "owner/gated" in line
    assert None in _GatedHub.authorizations
    assert "Bearer hf_test_token" in _GatedHub.authorizations
