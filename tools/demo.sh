#!/usr/bin/env bash
# Set up .venv (once), then run img2img with the embedded tiny demo preset:
# writes demo_input.png (a red square on blue) and demo_output.png.
# Usage: bash tools/demo.sh [extra `keras-diffusion img2img` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
.venv/bin/python - <<'PY'
import numpy as np
from PIL import Image

image = np.zeros((64, 64, 3), np.uint8)
image[:] = (40, 70, 200)
image[16:48, 16:48] = (220, 40, 40)
Image.fromarray(image).save("demo_input.png")
PY
.venv/bin/keras-diffusion img2img --preset sd3_tiny_demo --image demo_input.png \
  --prompt "a red circle on a blue background" --seed 0 --output demo_output.png "$@"
