"""The built-in preset catalogue.

The data lives in the repository's top-level `presets/catalogue.json`; the
package reaches it through the `keras_diffusion/builtin_presets` link, which
the wheel build copies in as package data. An entry either points at an
embedded preset folder (`path`, relative to `presets/`) or lists remote
`sources` (the Hugging Face repository first, the Kaggle handle second).
"""

import copy
import functools
import json
import os

BUILTIN_DIR = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "builtin_presets"
)
CATALOGUE_FILE = os.path.join(BUILTIN_DIR, "catalogue.json")


@functools.lru_cache(maxsize=1)
def _load():
    with open(CATALOGUE_FILE, encoding="utf-8") as f:
        return json.load(f)


def names():
    return sorted(_load())


def get(name):
    """Return a copy of the catalogue entry `name`, with `path` made absolute."""
    entries = _load()
    if name not in entries:
        raise ValueError(
            f"Unknown built-in preset {name!r}. Available: {', '.join(names())}."
        )
    entry = copy.deepcopy(entries[name])
    if entry.get("path"):
        entry["path"] = os.path.join(BUILTIN_DIR, entry["path"])
        if not os.path.isdir(entry["path"]):
            raise FileNotFoundError(
                f"Built-in preset {name!r} should be embedded at {entry['path']}, "
                "but that folder is missing (rebuild it: `python tools/train_demo.py`)."
            )
    return entry


def entries_for(registered_names):
    """Catalogue entries whose backbone class is one of `registered_names`.

    Entries without an `architecture` field are listed for every class, and
    `registered_names=None` lists every entry.
    """
    result = {}
    for name, entry in _load().items():
        arch = entry.get("architecture")
        if registered_names is None or arch is None or arch in registered_names:
            result[name] = copy.deepcopy(entry)
    return result
