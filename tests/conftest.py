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

# jax: XLA compiling dominates the jax leg, and many tests compile the same
# programs (a fresh task per comparison, the same preset in many files). A
# compilation cache shared by this run's xdist workers, empty at the start of
# each run, compiles each program once. Tracing still happens per function,
# so a value baked into a trace still changes the program and misses the cache.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"kd-test-jax-cache-{_RUN}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def record_dtypes(monkeypatch):
    """`record_dtypes(module, name)` wraps `module.name` for this test and
    returns the list of dtypes of its first tensor argument, one per call
    (which precision a backend kernel actually ran in)."""

    def record(module, name):
        original = getattr(module, name)
        dtypes = []

        def recording(*args, **kwargs):
            dtypes.append(next(a for a in args if hasattr(a, "dtype")).dtype)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recording)
        return dtypes

    return record
