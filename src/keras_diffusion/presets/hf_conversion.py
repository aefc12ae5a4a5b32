"""`hf://` handles of diffusers-layout repos: fetch, convert once, cache.

A Hugging Face repo with a `model_index.json` is a diffusers pipeline, not a
keras_diffusion preset. For such a repo, `resolve_hf`:

1. resolves the revision to a commit (fetching only `model_index.json`);
2. returns the cached conversion if there is one: a keras_diffusion preset
   at `$KERAS_DIFFUSION_CACHE/converted/<owner>--<repo>/<commit>/`
   (`KERAS_DIFFUSION_CACHE` defaults to `~/.cache/keras_diffusion`);
3. otherwise downloads only what the conversion reads (`select_files`):
   the pipeline index and scheduler config, each model component's
   `config.json` and one set of safetensors (the plain files, else a single
   half-precision variant; never `.bin`/`.ckpt`/`.pt`), the tokenizer files;
4. converts them with `DiffusersFolder` (a progress bar ticks once per
   component) and writes the preset with the atomic `save_preset`, so an
   interrupted or failed conversion leaves nothing in the cache.

The preset keeps the checkpoint's precision (float16 / bfloat16 weights stay
half size on disk); `open_converted` opens it in the current Keras dtype
policy unless `dtype=` is given, as loading the diffusers folder would.
`HF_TOKEN` is passed to the Hub; a gated repo without access raises a
`PermissionError` that says so (see `handles.download_hf`).

Examples:

>>> files = ["model_index.json", "transformer/config.json",
...          "transformer/diffusion_pytorch_model.safetensors",
...          "transformer/diffusion_pytorch_model.fp16.safetensors",
...          "transformer/diffusion_pytorch_model.bin", "sd3_medium.safetensors"]
>>> index = {"_class_name": "StableDiffusion3Pipeline",
...          "transformer": ["diffusers", "SD3Transformer2DModel"]}
>>> select_files(files, index)
['model_index.json', 'transformer/config.json', \
'transformer/diffusion_pytorch_model.safetensors']
"""

import json
import os
import re
import shutil
import tempfile

from keras_diffusion.presets import handles
from keras_diffusion.presets.preset_io import PresetFolder, is_preset
from keras_diffusion.utils.python_utils import read_json

CACHE_ENV = "KERAS_DIFFUSION_CACHE"
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
WEIGHT_COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_SHARD = re.compile(r"-\d+-of-\d+")
_COMMIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# One entry per conversion this process ran: {"repo", "commit", "files"}.
conversions = []


def cache_root():
    """The cache folder: `$KERAS_DIFFUSION_CACHE` or `~/.cache/keras_diffusion`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_diffusion"
    )
    return os.path.abspath(root)


def converted_dir(repo_id, commit):
    """Where the conversion of `repo_id` at `commit` is cached.

    Examples:

    >>> path = converted_dir("stabilityai/stable-diffusion-3.5-medium", "b940f67")
    >>> os.path.relpath(path, cache_root()).split(os.sep)
    ['converted', 'stabilityai--stable-diffusion-3.5-medium', 'b940f67']
    """
    if not _COMMIT.match(commit):
        raise ValueError(f"Unexpected commit {commit!r} for 'hf://{repo_id}'.")
    owner, name = repo_id.split("/")
    return os.path.join(cache_root(), "converted", f"{owner}--{name}", commit)


def is_diffusers_repo(path):
    return os.path.isfile(os.path.join(path, MODEL_INDEX))


def is_converted_preset(path):
    """True for a preset folder inside the conversion cache."""
    root = os.path.join(cache_root(), "converted")
    path = os.path.abspath(path)
    return is_preset(path) and os.path.commonpath([root, path]) == root


def _variant(filename):
    """None for plain weights, else the variant (`fp16`, ...) of a file name."""
    stem = filename[: -len(".safetensors")]
    if "." not in stem:
        return None
    return _SHARD.sub("", stem.split(".", 1)[1]) or None


def _weight_files(component, names):
    """One set of safetensors (+ index) of a component, plain ones first."""
    safetensors = [n for n in names if n.endswith(".safetensors")]
    by_variant = {}
    for name in safetensors:
        by_variant.setdefault(_variant(name), []).append(name)
    if not by_variant:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(
                f"Component {component!r} has only pickle weights "
                f"({', '.join(sorted(pickles))}); keras_diffusion never unpickles "
                "files. Use a repository (or revision) with .safetensors weights."
            )
        raise FileNotFoundError(f"Component {component!r} has no .safetensors weights.")
    order = [None, "fp16", "bf16", *sorted(v for v in by_variant if v)]
    variant = next(v for v in order if v in by_variant)
    chosen = by_variant[variant]
    for name in names:
        if not name.endswith(".json") or ".index" not in name:
            continue
        parts = name.split(".")
        plain_index = len(parts) == 4 and parts[1:] == ["safetensors", "index", "json"]
        if (variant is None and plain_index) or (variant and variant in parts):
            chosen.append(name)
    return sorted(f"{component}/{n}" for n in chosen)


def select_files(files, model_index):
    """The repo files a conversion of this diffusers pipeline reads.

    Args:
        files: every file path of the repo (`"transformer/config.json"`, ...).
        model_index: the parsed `model_index.json`.

    Raises:
        ValueError: a model component has only pickle weights.
        FileNotFoundError: a component lacks its config or weights.
    """
    listing = {}
    for path in files:
        folder, _, name = path.replace("\\", "/").partition("/")
        if name and "/" not in name:
            listing.setdefault(folder, []).append(name)
    selected = [MODEL_INDEX]
    if SCHEDULER_CONFIG in files:
        selected.append(SCHEDULER_CONFIG)
    for component, spec in model_index.items():
        if component.startswith("_") or not isinstance(spec, (list, tuple)):
            continue
        if spec[-1] is None:
            continue
        names = listing.get(component, [])
        if component in WEIGHT_COMPONENTS:
            if "config.json" not in names:
                raise FileNotFoundError(f"Component {component!r} has no config.json.")
            selected.append(f"{component}/config.json")
            selected.extend(_weight_files(component, names))
        elif component.startswith("tokenizer"):
            selected.extend(f"{component}/{n}" for n in TOKENIZER_FILES if n in names)
    return selected


def _is_offline():
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in ("1", "on", "yes", "true")


def _repo_files(repo_id, commit, snapshot):
    """All file paths of the repo: from the Hub, else from the local snapshot."""
    if not _is_offline():
        from huggingface_hub import HfApi

        try:
            return HfApi().list_repo_files(
                repo_id, revision=commit, token=os.environ.get("HF_TOKEN") or None
            )
        except OSError:
            pass  # unreachable: fall back to what the cache holds
    files = []
    for root, _, names in os.walk(snapshot):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), snapshot)
            files.append(rel.replace(os.sep, "/"))
    return files


def _read_json(path):
    return read_json(path, f"Corrupt {path}")


def resolve_hf(repo_id, revision=None, allow_patterns=None):
    """A local folder for `hf://repo_id[@revision]`.

    The repo's preset files (those matching `allow_patterns`, by default
    `handles.PRESET_PATTERNS`), or, for a diffusers repo, its cached
    conversion, made on first use.

    Examples:
    ```python
    folder = resolve_hf("stabilityai/stable-diffusion-3.5-medium")
    # -> ~/.cache/keras_diffusion/converted/stabilityai--stable-diff.../<commit>
    ```
    """
    probe = handles.download_hf(repo_id, revision, [MODEL_INDEX])
    commit = os.path.basename(os.path.normpath(probe))
    if not is_diffusers_repo(probe):
        return handles.download_hf(repo_id, commit, allow_patterns)
    target = converted_dir(repo_id, commit)
    if is_preset(target):
        return target  # converted before: no download, no conversion
    index = _read_json(os.path.join(probe, MODEL_INDEX))
    files = select_files(_repo_files(repo_id, commit, probe), index)
    snapshot = handles.download_hf(repo_id, commit, files)
    missing = [f for f in files if not os.path.isfile(os.path.join(snapshot, f))]
    if missing:
        raise OSError(
            f"Could not fetch {missing} of 'hf://{repo_id}' (commit {commit}); "
            "the Hub is unreachable and the files are not in the local cache."
        )
    convert(snapshot, files, target, f"hf://{repo_id}@{commit}")
    conversions.append({"repo": repo_id, "commit": commit, "files": list(files)})
    return target


def _link_view(snapshot, files, view):
    """A folder showing only `files` of the snapshot, so nothing else is read."""
    for rel in files:
        dst = os.path.join(view, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        src = os.path.realpath(os.path.join(snapshot, rel))
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def storage_dtype(paths):
    """The float dtype all the safetensors' floating tensors share, else float32.

    Examples:

    >>> import tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "half.safetensors")
    >>> save_file({"w": np.zeros(2, np.float16), "i": np.zeros(2, np.int64)}, path)
    >>> storage_dtype([path])
    'float16'
    """
    found = set()
    for path in paths:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > os.path.getsize(path):
                return "float32"  # corrupt: the conversion itself will say so
            header = json.loads(f.read(length) or b"{}")
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype", "").startswith(("F", "BF")):
                found.add(_DTYPES.get(info["dtype"], "float32"))
    return found.pop() if len(found) == 1 else "float32"


class _Progress:
    """One tick per converted component: tqdm if installed, else Progbar."""

    def __init__(self, total, title):
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=title, unit="component")
        except ImportError:
            import keras

            print(title)
            self._bar = keras.utils.Progbar(total, unit_name="component")
        self._done = 0

    def tick(self, name):
        self._done += 1
        if hasattr(self._bar, "set_postfix_str"):
            self._bar.set_postfix_str(name)
            self._bar.update(1)
        else:
            self._bar.update(self._done)

    def close(self):
        if hasattr(self._bar, "close"):
            self._bar.close()


def convert(snapshot, files, target, handle):
    """Convert the diffusers `files` of `snapshot` into a preset at `target`."""
    from keras_diffusion.converters.diffusers_folder import DiffusersFolder
    from keras_diffusion.converters.safetensors_reader import TensorSource
    from keras_diffusion.models.stable_diffusion_3.stable_diffusion_3_image_to_image import (  # noqa: E501
        StableDiffusion3ImageToImage,
    )

    if os.path.exists(target) and not is_preset(target):
        shutil.rmtree(target)  # debris of an older, non-atomic writer
    with tempfile.TemporaryDirectory(prefix="kd-convert-") as view:
        _link_view(snapshot, files, view)
        folder = DiffusersFolder(view, handle)
        weights = [os.path.join(view, f) for f in files if f.endswith(".safetensors")]
        for path in weights:  # fail fast on a truncated or corrupt download
            TensorSource.from_files(path)
        dtype = storage_dtype(weights)
        steps = [c for c in WEIGHT_COMPONENTS if c in folder.components]
        if not folder.has_t5 and "text_encoder_3" in steps:
            steps.remove("text_encoder_3")
        progress = _Progress(len(steps) + 2, f"Converting {handle} to keras_diffusion")
        try:
            backbone = folder.load_backbone(None, True, dtype, progress=progress.tick)
            preprocessor = folder.load_preprocessor()
            progress.tick("tokenizers")
            task = StableDiffusion3ImageToImage(backbone, preprocessor)
            from keras_diffusion.presets.preset_io import save_preset

            save_preset(target, backbone=backbone, preprocessor=preprocessor, task=task)
            progress.tick("saved")
        finally:
            progress.close()


class ConvertedPreset(PresetFolder):
    """A cached conversion: loads in the current dtype policy by default.

    `from_preset` opens the conversions of `hf://` diffusers repos with it.

    Examples:
    ```python
    task = keras_diffusion.models.ImageToImage.from_preset(
        "hf://stabilityai/stable-diffusion-3.5-medium"  # converted on first use
    )
    ```
    """

    def load_backbone(self, expected_base, load_weights=True, dtype=None):
        import keras

        dtype = dtype or keras.config.dtype_policy().name
        return super().load_backbone(expected_base, load_weights, dtype)


def open_converted(path, handle=None):
    return ConvertedPreset(path, handle=handle)
