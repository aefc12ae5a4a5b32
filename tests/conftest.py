"""Test set-up shared by every test file.

The hubs are unreachable here, so the real `huggingface_hub` and `kagglehub`
clients run against caches that the tests fill in the clients' own layouts.
The environment is set before either client is imported.
"""

import os
import tempfile

_HUB_ROOT = tempfile.mkdtemp(prefix="kd-test-hubs-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(_HUB_ROOT, "hf")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["KAGGLEHUB_CACHE"] = os.path.join(_HUB_ROOT, "kaggle")
os.environ["KERAS_DIFFUSION_CACHE"] = os.path.join(_HUB_ROOT, "keras_diffusion")
os.environ.pop("HF_TOKEN", None)

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
