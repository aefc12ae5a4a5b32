"""Test set-up shared by every test file.

The hubs are unreachable here, so the real `huggingface_hub` and `kagglehub`
clients run against caches that the tests fill in the clients' own layouts.
The environment is set before either client is imported.
"""

import os
import shutil
import tempfile
import uuid

# Everything a run writes lives under one folder, removed when the run ends.
# xdist workers get the controller's run id (`pytest_configure` below), so the
# controller removes their folders too.
_IS_WORKER = "PYTEST_XDIST_WORKER" in os.environ
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex


def _run_root(run_id):
    return os.path.join(tempfile.gettempdir(), f"kd-test-{run_id}")


os.makedirs(_run_root(_RUN), exist_ok=True)
_HUB_ROOT = tempfile.mkdtemp(prefix="hubs-", dir=_run_root(_RUN))
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
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(_run_root(_RUN), "jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    # Without `--testrunuid`, xdist would give the workers a fresh id of its own.
    if not _IS_WORKER and getattr(config.option, "testrunuid", "") is None:
        config.option.testrunuid = _RUN


def pytest_unconfigure(config):
    # The workers have exited by now: the controller's unconfigure runs last.
    if _IS_WORKER:
        shutil.rmtree(_HUB_ROOT, ignore_errors=True)
        return
    for run_id in {_RUN, getattr(config.option, "testrunuid", None) or _RUN}:
        shutil.rmtree(_run_root(run_id), ignore_errors=True)


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


@pytest.fixture
def dot_result_dtypes():
    """`dot_result_dtypes(fn, *args)`: on jax, the result dtype of each dot
    in `fn`'s jaxpr, nested ones included (which XLA kernel a dot asks for)."""
    import jax

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield str(eqn.outvars[0].aval.dtype)
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)

    return lambda fn, *args: list(walk(jax.make_jaxpr(fn)(*args).jaxpr))
