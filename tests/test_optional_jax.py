"""Importing keras_diffusion keeps jax out of tensorflow and torch processes."""

import importlib.util
import os
import subprocess
import sys

import keras
import pytest

from keras_diffusion.utils import optional_jax

BACKEND = keras.backend.backend()

# Imports the library, reports whether jax came with it, then shows that jax
# itself still imports and runs afterwards.
SCRIPT = r"""
import sys
import keras_diffusion
loaded = "jax" in sys.modules
import jax
assert float(jax.numpy.ones(3).sum()) == 3.0
print("jax loaded with keras_diffusion:", loaded)
"""


def _run(extra_env=None):
    env = dict(os.environ)
    env.update(extra_env or {})
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed"
)


@needs_jax
def test_import_loads_jax_only_on_the_jax_backend():
    expected = "True" if BACKEND == "jax" else "False"
    assert _run() == f"jax loaded with keras_diffusion: {expected}"


@needs_jax
@pytest.mark.skipif(BACKEND == "jax", reason="the jax backend imports jax itself")
def test_opt_out_keeps_the_optional_imports():
    # Without the finder, Keras' and TFLite's optional imports load jax: this
    # is what the default run above avoids.
    line = _run({optional_jax.OPT_OUT_VARIABLE: "1"})
    assert line == "jax loaded with keras_diffusion: True"


def test_finder_declines_only_the_listed_importers(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.delenv(optional_jax.OPT_OUT_VARIABLE, raising=False)
    declined_code = "try:\n    import jax\nexcept ImportError as e:\n    error = e\n"
    with optional_jax.declined_optional_jax() as finder:
        assert finder in sys.meta_path
        for importer in optional_jax.DECLINED_FOR:
            scope = {"__name__": importer}
            exec(declined_code, scope)
            assert isinstance(scope["error"], ModuleNotFoundError)
            assert optional_jax.OPT_OUT_VARIABLE in str(scope["error"])
        # Any other importer goes through to the normal finders.
        assert finder.find_spec("jax") is None
        assert finder.find_spec("numpy") is None
    assert finder.declined == list(optional_jax.DECLINED_FOR)
    assert finder not in sys.meta_path


def test_nothing_is_installed_when_opted_out(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.setenv(optional_jax.OPT_OUT_VARIABLE, "1")
    before = list(sys.meta_path)
    with optional_jax.declined_optional_jax() as finder:
        assert finder is None
        assert sys.meta_path == before


def test_docstring_examples():
    import doctest

    result = doctest.testmod(optional_jax)
    assert result.attempted > 0 and result.failed == 0
