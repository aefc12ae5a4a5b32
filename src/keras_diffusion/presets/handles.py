"""Turn a preset handle into a local folder.

Handles come in four forms:

- a built-in name from the catalogue (`stable_diffusion_3_medium`);
- `kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]`, through `kagglehub`;
- `hf://OWNER/REPO[@REVISION]`, through `huggingface_hub` (a diffusers-layout
  repo resolves to its cached keras_diffusion conversion: `hf_conversion`);
- a path to a local folder (or, for checkpoints, a local file).

Anything else is a ValueError that says which forms are accepted.
"""

import os
import re

from keras_diffusion.presets import catalogue

HF_SCHEME = "hf://"
KAGGLE_SCHEME = "kaggle://"

# Files a keras_diffusion preset may hold; a diffusers repo holds others.
PRESET_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.h5",  # presets from before the safetensors format
    "assets/*",
    "assets/**/*",
]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")

HANDLE_FORMS = (
    "a built-in preset name (see `ImageToImage.presets`), "
    "'kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]', "
    "'hf://OWNER/REPO[@REVISION]', or a path to a local preset folder"
)


class Handle:
    """A parsed preset handle: `kind` is builtin, kaggle, hf or local."""

    def __init__(self, kind, value, revision=None):
        self.kind = kind
        self.value = value
        self.revision = revision

    def __repr__(self):
        return f"Handle({self.kind!r}, {self.value!r}, revision={self.revision!r})"


def _check_segments(handle, segments, expected):
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise ValueError(
                f"Malformed preset handle {handle!r}: segment {segment!r} is not "
                f"allowed (no empty, '.', '..' or absolute parts). Expected "
                f"{expected}."
            )


def parse(preset):
    """Parse `preset` into a Handle without touching disk or network."""
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str) or not preset.strip():
        raise ValueError(f"`preset` must be a non-empty string: {HANDLE_FORMS}.")
    if preset.startswith(HF_SCHEME):
        body = preset[len(HF_SCHEME) :]
        repo, _, revision = body.partition("@")
        expected = "'hf://OWNER/REPO' or 'hf://OWNER/REPO@REVISION'"
        segments = repo.split("/")
        if len(segments) != 2:
            raise ValueError(
                f"Malformed preset handle {preset!r}. Expected {expected}."
            )
        _check_segments(preset, segments, expected)
        if "@" in body and (
            not revision or ".." in revision or not _REVISION.match(revision)
        ):
            raise ValueError(
                f"Malformed revision in {preset!r}. Expected {expected}, where "
                "REVISION is a branch, tag or commit hash."
            )
        return Handle("hf", repo, revision or None)
    if preset.startswith(KAGGLE_SCHEME):
        body = preset[len(KAGGLE_SCHEME) :]
        segments = body.split("/")
        expected = "'kaggle://OWNER/MODEL/FRAMEWORK/VARIATION[/VERSION]'"
        if len(segments) not in (4, 5):
            raise ValueError(
                f"Malformed preset handle {preset!r}. Expected {expected}."
            )
        _check_segments(preset, segments, expected)
        if len(segments) == 5 and not segments[4].isdigit():
            raise ValueError(
                f"Malformed preset handle {preset!r}: VERSION must be a number. "
                f"Expected {expected}."
            )
        return Handle("kaggle", body)
    if "://" in preset:
        raise ValueError(
            f"Unknown scheme in preset handle {preset!r}. Use {HANDLE_FORMS}."
        )
    if os.path.exists(preset):
        return Handle("local", os.path.abspath(preset))
    if preset in catalogue.names():
        return Handle("builtin", preset)
    if os.sep in preset or preset.startswith("."):
        raise FileNotFoundError(f"Preset folder {preset!r} does not exist.")
    raise ValueError(
        f"Unknown preset {preset!r}. Built-in presets: "
        f"{', '.join(catalogue.names())}. Other accepted forms: {HANDLE_FORMS}."
    )


def resolve(preset, allow_patterns=None):
    """Return a local path (folder or file) holding the preset's files.

    Built-in names resolve to their catalogue source. Remote handles are
    downloaded through the hubs' own clients, which cache them.
    """
    handle = parse(preset)
    if handle.kind == "local":
        return handle.value
    if handle.kind == "builtin":
        return resolve_builtin(handle.value, allow_patterns)
    if handle.kind == "kaggle":
        return download_kaggle(handle.value)
    # A diffusers-layout repo resolves to its cached keras_diffusion conversion.
    from keras_diffusion.presets import hf_conversion

    return hf_conversion.resolve_hf(handle.value, handle.revision, allow_patterns)


def resolve_builtin(name, allow_patterns=None):
    entry = catalogue.get(name)
    if entry.get("path"):
        return entry["path"]
    errors = []
    for source in entry["sources"]:
        try:
            return resolve(source, allow_patterns)
        except (OSError, RuntimeError, ValueError) as e:
            errors.append(f"  {source}: {type(e).__name__}: {e}")
    raise OSError(
        f"Could not fetch built-in preset {name!r} from any of its sources:\n"
        + "\n".join(errors)
    )


def download_kaggle(handle):
    import kagglehub

    try:
        return kagglehub.model_download(handle)
    except Exception as e:  # kagglehub raises many types; keep its message
        raise OSError(
            f"Could not fetch 'kaggle://{handle}' with kagglehub (tried to download "
            f"the model files from Kaggle Models): {e}"
        ) from e


def download_hf(repo_id, revision=None, allow_patterns=None):
    import huggingface_hub
    from huggingface_hub import errors

    allow_patterns = allow_patterns or PRESET_PATTERNS
    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except errors.GatedRepoError as e:
        raise PermissionError(
            f"'hf://{repo_id}' is a gated repository. Accept its licence on "
            f"https://huggingface.co/{repo_id} and set HF_TOKEN to a token of an "
            "account with access."
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise OSError(
            f"'hf://{repo_id}' was not found on the Hugging Face Hub (or it is "
            "private: set HF_TOKEN)."
        ) from e
    except (errors.LocalEntryNotFoundError, OSError) as e:
        raise OSError(
            f"Could not fetch 'hf://{repo_id}' (revision {revision or 'main'}) from "
            f"https://huggingface.co/{repo_id}: the Hub is unreachable and the "
            f"files are not in the local cache. Tried files matching "
            f"{allow_patterns}. ({type(e).__name__}: {e})"
        ) from e
