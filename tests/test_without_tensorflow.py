"""TensorFlow is optional: jax and torch users load, generate and save without it."""

import os
import subprocess
import sys

import keras
import pytest

SCRIPT = r"""
import sys
sys.modules["tensorflow"] = None  # any `import tensorflow` now fails
import numpy as np
import keras_diffusion as kd

task = kd.models.ImageToImage.from_preset("sd3_tiny_demo")
image = np.zeros((64, 64, 3), np.uint8)
out = task.generate(image, "a red circle", num_steps=2, seed=0)
assert out.shape == (64, 64, 3), out.shape
task.save_to_preset(sys.argv[1])
kd.models.ImageToImage.from_preset(sys.argv[1])
assert "tensorflow" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
print("ok")
"""


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="the TF backend needs TensorFlow"
)
def test_load_generate_save_without_tensorflow(tmp_path):
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "p")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
