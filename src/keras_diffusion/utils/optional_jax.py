"""Keep jax out of tensorflow and torch processes that never use it.

Where jax is installed, importing Keras loads it even on the tensorflow and
torch backends, through two optional imports that this library never needs:

- TFLite's `tensorflow.lite.python.util` imports `jax.jit` for its jax
  converter (`TFLiteConverter.experimental_from_jax`);
- Keras' `keras.src.callbacks.orbax_checkpoint` imports jax to patch
  `jax.monitoring` for old jax releases.

That costs about 0.4 s of import time and 0.11-0.15 GB of resident memory
(jaxlib's libraries) on this project's 2-core benchmark machine. While
`keras_diffusion` imports Keras, `declined_optional_jax()` makes exactly those
two imports fail as if jax were missing, which both modules expect. Every
other import of jax, before, during or after, is untouched; after the block
the finder is gone, so `import jax` works as usual. On the jax backend, Keras
imports jax itself first and nothing is declined.

Set `KERAS_DIFFUSION_KEEP_OPTIONAL_JAX=1` to keep TFLite's jax converter
(or import Keras before `keras_diffusion`).
"""

import contextlib
import importlib.abc
import os
import sys

OPT_OUT_VARIABLE = "KERAS_DIFFUSION_KEEP_OPTIONAL_JAX"
DECLINED_FOR = ("tensorflow.lite.python.util", "keras.src.callbacks.orbax_checkpoint")


class _OptionalJaxFinder(importlib.abc.MetaPathFinder):
    """Declines `import jax` when one of `DECLINED_FOR` runs it."""

    def __init__(self):
        self.declined = []

    def find_spec(self, name, path=None, target=None):
        if name != "jax":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            importer = frame.f_globals.get("__name__")
            if importer in DECLINED_FOR:
                self.declined.append(importer)
                raise ModuleNotFoundError(
                    f"keras_diffusion declined {importer}'s optional import of "
                    f"jax (set {OPT_OUT_VARIABLE}=1 to allow it).",
                    name=name,
                )
            frame = frame.f_back
        return None


@contextlib.contextmanager
def declined_optional_jax():
    """Within the block, the optional jax imports of `DECLINED_FOR` fail.

    Yields the finder (its `declined` lists the importers it refused), or
    None where nothing is to be done: jax is already imported, or the opt-out
    variable is set.

    Examples:

    >>> with declined_optional_jax() as finder:
    ...     pass
    >>> finder is None or finder not in sys.meta_path
    True
    """
    if "jax" in sys.modules or os.environ.get(OPT_OUT_VARIABLE) == "1":
        yield None
        return
    finder = _OptionalJaxFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
